variable "name_prefix" {
  description = "Prefix of every resource name (e.g. amphi-prod)."
  type        = string
  default     = "amphi"
}

variable "origins" {
  description = "Origins to take program streams from (the origin module's `origins` output); every packager links to all of them."
  type = list(object({
    id          = string
    addr        = string
    server_name = string
  }))
}

variable "token_public_keys" {
  description = "The geo-router's token verification keys (Ed25519 SPKI PEM) with their kid: its recording grants (signed URLs of private recordings, publish and delete requests) are checked with them."
  type = list(object({
    kid = string
    pem = string
  }))
}

variable "vpc_id" {
  description = "VPC of the origin region."
  type        = string
}

variable "subnet_ids" {
  description = "Public subnets (at least two availability zones) for the load balancer and the packagers."
  type        = list(string)
}

variable "instance_type" {
  description = "EC2 instance type of a packager."
  type        = string
  default     = "c6i.xlarge"
}

variable "ami_id" {
  description = "AMI of the packagers; empty means the latest Debian 12 (bookworm) amd64 image."
  type        = string
  default     = ""
}

variable "http_port" {
  description = "TCP port of the packager's HTTP origin (/hls/..., /metrics, /healthz) on the instances."
  type        = number
  default     = 8400
}

variable "https_port" {
  description = "TCP port of the packager's HTTPS listener (the same resources, HTTP/2 and HTTP/1.1) on the instances; the load balancer forwards to it."
  type        = number
  default     = 8443
}

variable "data_volume_gb" {
  description = "Size of the data volume holding parts, segments, playlists and recordings, in GiB."
  type        = number
  default     = 200
}

variable "certificate_arn" {
  description = "ACM certificate (this region) for the load balancer's HTTPS listener."
  type        = string
}

variable "public_hostname" {
  description = "DNS name of the packager origin (points at the load balancer; CloudFront fetches playlists from https://<this>)."
  type        = string
}

variable "router_cidrs" {
  description = "CIDRs of geo-routers that proxy /hls/ to the packagers (besides CloudFront, which is always allowed)."
  type        = list(string)
  default     = []
}

variable "monitoring_cidrs" {
  description = "CIDRs allowed to scrape the packagers' /metrics directly (Prometheus)."
  type        = list(string)
  default     = []
}

variable "mesh_tls_secret_arn" {
  description = "Secrets Manager secret holding the packagers' mesh mTLS material as JSON {\"ca\", \"cert\", \"key\"} (PEM strings)."
  type        = string
}

variable "media_bucket_arn" {
  description = "ARN of the CDN media bucket the packagers may write parts and segments to (under hls/)."
  type        = string
}

variable "artifact_bucket" {
  description = "S3 bucket holding the amphi release binary."
  type        = string
}

variable "artifact_key" {
  description = "S3 key of the amphi release binary (x86_64 Linux)."
  type        = string
}

variable "artifact_region" {
  description = "AWS region of the artifact bucket."
  type        = string
}

variable "artifact_sha256" {
  description = "SHA-256 of the amphi binary; user data refuses any other file."
  type        = string
}

variable "deletion_protection" {
  description = "Protect the load balancer from deletion."
  type        = bool
  default     = true
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}

variable "packager_count" {
  description = "Number of packagers. Each links to every origin and packages every room, so any of them answers any playlist request; the load balancer fails over between them."
  type        = number
  default     = 1
  validation {
    condition     = var.packager_count >= 1
    error_message = "packager_count must be at least 1."
  }
}

variable "storage_endpoint" {
  description = "Endpoint of an S3-compatible server to store in instead of AWS S3 (path-style addressing); empty: AWS S3 in this region, the media bucket."
  type        = string
  default     = ""
}

variable "storage_keys_secret_arns" {
  description = "Static S3 keys for an S3-compatible storage_endpoint: Secrets Manager secrets (plain strings) of the access key id and the secret access key. Null: the instance profile's credentials (AWS S3)."
  type = object({
    access_key = string
    secret_key = string
  })
  default = null
}
