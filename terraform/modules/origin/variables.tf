variable "name_prefix" {
  description = "Prefix of every resource name (e.g. amphi-prod)."
  type        = string
  default     = "amphi"
}

variable "origin_count" {
  description = "Number of origins. Rooms are spread over them by rendezvous hashing on their ids, so each one has a stable id and address."
  type        = number
  default     = 1
}

variable "vpc_id" {
  description = "VPC of the origin region (e.g. the edge-region module's vpc_id there)."
  type        = string
}

variable "subnet_ids" {
  description = "Public subnets for the origins (spread round-robin); each origin gets an Elastic IP."
  type        = list(string)
}

variable "instance_type" {
  description = "EC2 instance type of an origin (the mixer takes one core per few hundred rooms: see docs/capacity.md)."
  type        = string
  default     = "c6i.4xlarge"
}

variable "ami_id" {
  description = "AMI of the origins; empty means the latest Debian 12 (bookworm) amd64 image."
  type        = string
  default     = ""
}

variable "quic_port" {
  description = "UDP port of the origin's QUIC listener (edges, packagers and geo-routers connect with mTLS)."
  type        = number
  default     = 4433
}

variable "metrics_port" {
  description = "TCP port of the origin's /metrics HTTP listener."
  type        = number
  default     = 9300
}

variable "server_name" {
  description = "TLS server name in the origins' mesh certificate (peers check it)."
  type        = string
  default     = "origin.amphi.internal"
}

variable "mesh_tls_secret_arn" {
  description = "Secrets Manager secret holding the origins' mesh mTLS material as JSON {\"ca\", \"cert\", \"key\"} (PEM strings)."
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

variable "mesh_peer_cidrs" {
  description = "CIDRs allowed to open QUIC connections to the origins (edges in every region reach them over the internet; mTLS authenticates every peer)."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

variable "monitoring_cidrs" {
  description = "CIDRs allowed to scrape the origins' /metrics (Prometheus)."
  type        = list(string)
  default     = []
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}

variable "idle_room_timeout_secs" {
  description = "A live room without speakers for this many seconds is ended (0 = never)."
  type        = number
  default     = 3600
}

variable "redis_url" {
  description = "Redis for durable room state (participants, roles, hands, bans), so the origin that takes a room over loads it: rediss://host:port/db, with @REDIS_AUTH_TOKEN@ where the AUTH password goes (rediss://:@REDIS_AUTH_TOKEN@@host:port/1) when redis_auth_secret_arn is set; use another database than the geo-routers'. Empty: room state in memory only (a room that moves loses its roles and bans)."
  type        = string
  default     = ""
}

variable "redis_auth_secret_arn" {
  description = "Secrets Manager secret holding the Redis AUTH token (a plain string), filled into redis_url at boot; empty: no password."
  type        = string
  default     = ""
}
