variable "name_prefix" {
  description = "Prefix of every resource name."
  type        = string
  default     = "amphi"
}

variable "domain" {
  description = "DNS domain of the deployment (a Route 53 public zone): api.<domain>, hls.<domain>, edge-<region>.<domain>, packager.<domain>."
  type        = string
}

variable "zone_id" {
  description = "Route 53 hosted zone ID of domain."
  type        = string
}

variable "edge_certificate_arns" {
  description = "ACM certificate per edge region (keys: us-east-1, us-west-2, eu-west-1, ap-southeast-1, ap-southeast-2), covering edge-<region>.<domain>."
  type        = map(string)
}

variable "api_certificate_arns" {
  description = "ACM certificate per router region (same keys as edge_certificate_arns), covering api.<domain>."
  type        = map(string)
}

variable "packager_certificate_arn" {
  description = "ACM certificate in us-east-1 covering packager.<domain>."
  type        = string
}

variable "cloudfront_certificate_arn" {
  description = "ACM certificate in us-east-1 covering hls.<domain> (CloudFront)."
  type        = string
}

variable "cloudfront_web_acl_arn" {
  description = "WAFv2 web ACL (scope CLOUDFRONT) for the HLS distribution."
  type        = string
}

variable "media_bucket_name" {
  description = "Globally unique name of the HLS media bucket."
  type        = string
}

variable "log_bucket_name" {
  description = "Globally unique name of the CloudFront log bucket."
  type        = string
}

variable "artifact_bucket" {
  description = "S3 bucket (in us-east-1) holding the amphi release binary."
  type        = string
}

variable "artifact_key" {
  description = "S3 key of the amphi release binary."
  type        = string
}

variable "artifact_sha256" {
  description = "SHA-256 of the amphi release binary."
  type        = string
}

variable "edge_tls_secret_arn" {
  description = "Secrets Manager secret (us-east-1) with the edges' mesh mTLS material as JSON {ca, cert, key}; the certificate carries the URI SAN amphi-role:edge."
  type        = string
}

variable "origin_tls_secret_arn" {
  description = "Secrets Manager secret (us-east-1) with the origins' mesh mTLS material as JSON {ca, cert, key}; the certificate names origin_server_name and carries the URI SAN amphi-role:origin."
  type        = string
}

variable "packager_tls_secret_arn" {
  description = "Secrets Manager secret (us-east-1) with the packagers' mesh mTLS material as JSON {ca, cert, key}; the certificate carries the URI SAN amphi-role:packager."
  type        = string
}

variable "router_tls_secret_arn" {
  description = "Secrets Manager secret (us-east-1) with the geo-routers' mesh mTLS material as JSON {ca, cert, key}; the certificate carries the URI SAN amphi-role:router."
  type        = string
}

variable "signing_secret_arn" {
  description = "Secrets Manager secret (us-east-1) with the token signing key (PKCS#8 PEM from `amphi token keygen`)."
  type        = string
}

variable "geoip_object_key" {
  description = "S3 key, in artifact_bucket, of a GeoIP City database (.mmdb) the geo-routers install at boot; empty: every client goes to the default region."
  type        = string
  default     = ""
}

variable "signing_kid" {
  description = "Key id of the signing key."
  type        = string
  default     = "k1"
}

variable "token_public_keys" {
  description = "Token verification keys the edges accept (the signing key's public half, plus any key being rotated out)."
  type = list(object({
    kid = string
    pem = string
  }))
}

variable "redis_auth_secret_arn" {
  description = "Secrets Manager secret (us-east-1) holding the Redis AUTH token as a plain string (16 to 128 characters, URL-safe): the cache is created with it and the geo-routers read it at boot."
  type        = string
}

variable "api_key_id" {
  description = "Id of the geo-router API key the edges sign their heartbeats with (operators may use it for the room API too)."
  type        = string
  default     = "edge"
}

variable "api_key_secret_arn" {
  description = "Secrets Manager secret (us-east-1) holding that API key's secret as a plain string (URL-safe, e.g. `openssl rand -hex 32`); routers and edges read it at boot."
  type        = string
}

variable "origin_count" {
  description = "Number of origins (rooms are hashed over them)."
  type        = number
  default     = 1
}

variable "origin_server_name" {
  description = "TLS server name in the origins' certificate."
  type        = string
  default     = "origin.amphi.internal"
}

variable "edge_sizes" {
  description = "Edge group size per region: min, max and desired node counts (docs/capacity.md derives them)."
  type = map(object({
    min     = number
    max     = number
    desired = number
  }))
  default = {
    "us-east-1"      = { min = 2, max = 40, desired = 2 }
    "us-west-2"      = { min = 2, max = 40, desired = 2 }
    "eu-west-1"      = { min = 2, max = 40, desired = 2 }
    "ap-southeast-1" = { min = 2, max = 40, desired = 2 }
    "ap-southeast-2" = { min = 2, max = 40, desired = 2 }
  }
}

variable "geo_router_all_regions" {
  description = "Run geo-routers in all five regions (latency-routed). Keep false while the router holds rooms in memory: then only the us-east-1 group runs, still behind its latency record."
  type        = bool
  default     = false
}

variable "monitoring_cidrs" {
  description = "CIDRs of the Prometheus servers that scrape every node's /metrics."
  type        = list(string)
  default     = []
}

variable "tags" {
  description = "Tags on every resource (provider default_tags)."
  type        = map(string)
  default = {
    project = "amphi"
  }
}
