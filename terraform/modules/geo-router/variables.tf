variable "name_prefix" {
  description = "Prefix of every resource name (e.g. amphi-prod)."
  type        = string
  default     = "amphi"
}

variable "region_name" {
  description = "AWS region of this router group (the Route 53 latency record's region and set identifier)."
  type        = string
}

variable "vpc_id" {
  description = "VPC of this region (the edge-region module's vpc_id)."
  type        = string
}

variable "subnet_ids" {
  description = "Public subnets (at least two availability zones) for the load balancer and the routers."
  type        = list(string)
}

variable "instance_type" {
  description = "EC2 instance type of a router."
  type        = string
  default     = "c6i.large"
}

variable "ami_id" {
  description = "AMI of the routers; empty means the latest Debian 12 (bookworm) amd64 image."
  type        = string
  default     = ""
}

variable "min_size" {
  description = "Minimum number of routers in this region."
  type        = number
  default     = 1
}

variable "max_size" {
  description = "Maximum number of routers in this region."
  type        = number
  default     = 4
}

variable "http_port" {
  description = "TCP port of the router's HTTP listener (REST API, web client, /hls proxy, /metrics) on the instances."
  type        = number
  default     = 8080
}

variable "certificate_arn" {
  description = "ACM certificate (this region) for the load balancer's HTTPS listener, covering api_hostname."
  type        = string
}

variable "zone_id" {
  description = "Route 53 hosted zone of api_hostname."
  type        = string
}

variable "api_hostname" {
  description = "Public host name of the API (one latency record per region under this name)."
  type        = string
}

variable "default_region" {
  description = "amphi region for clients the router cannot place."
  type        = string
}

variable "edges" {
  description = "Every region's edge entry point: id, region name, and public URL (the edge-region module's public_url)."
  type = list(object({
    id         = string
    region     = string
    public_url = string
  }))
}

variable "region_coordinates" {
  description = "Latitude and longitude of each region named in edges (degrees)."
  type = map(object({
    latitude  = number
    longitude = number
  }))
}

variable "origins" {
  description = "Origins the router links to (the origin module's `origins` output)."
  type = list(object({
    id          = string
    addr        = string
    server_name = string
  }))
}

variable "packager_url" {
  description = "Base URL of the packager origin (proxied under /hls)."
  type        = string
}

variable "hls_base_url" {
  description = "Base URL of the HLS tier handed to listeners (the cdn module's hls_base_url): players fetch <this>/hls/{room}/index.m3u8."
  type        = string
}

variable "trusted_proxies" {
  description = "CIDRs whose Forwarded / X-Forwarded-For headers the router believes: the load balancer's subnets (the VPC CIDR)."
  type        = list(string)
}

variable "redis_url" {
  description = "Redis shared by the routers (room directory, edge registry): rediss://host:port, with @REDIS_AUTH_TOKEN@ where the AUTH password goes (rediss://:@REDIS_AUTH_TOKEN@@host:port) when redis_auth_secret_arn is set."
  type        = string
}

variable "redis_auth_secret_arn" {
  description = "Secrets Manager secret holding the Redis AUTH token (a plain string), filled into redis_url at boot; empty: no password."
  type        = string
  default     = ""
}

variable "api_key_id" {
  description = "Id of the router's API key (edges sign heartbeats with it; operators sign room API calls)."
  type        = string
}

variable "api_key_secret_arn" {
  description = "Secrets Manager secret holding that API key's secret (a plain string), filled into the config at boot."
  type        = string
}

variable "token_ttl_secs" {
  description = "Lifetime of the room tokens the router mints, in seconds."
  type        = number
  default     = 21600
}

variable "signing_kid" {
  description = "Key id written into minted tokens (edges must know its public key under this kid)."
  type        = string
}

variable "signing_secret_arn" {
  description = "Secrets Manager secret holding the Ed25519 signing key (PKCS#8 PEM, as made by `amphi token keygen`)."
  type        = string
}

variable "mesh_tls_secret_arn" {
  description = "Secrets Manager secret holding the router's mesh mTLS material as JSON {\"ca\", \"cert\", \"key\"} (for its links to the origins)."
  type        = string
}

variable "secret_region" {
  description = "AWS region of the Secrets Manager secrets (empty: this region)."
  type        = string
  default     = ""
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

variable "monitoring_cidrs" {
  description = "CIDRs allowed to scrape the routers' /metrics directly (Prometheus)."
  type        = list(string)
  default     = []
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

variable "geoip_object_key" {
  description = "S3 key, in artifact_bucket, of a GeoIP City database (.mmdb: MaxMind GeoLite2/GeoIP2 City or dbip City Lite) the routers install at boot and place clients with; empty: no database, every client goes to default_region."
  type        = string
  default     = ""
}
