variable "name_prefix" {
  description = "Prefix of every resource name (e.g. amphi-prod)."
  type        = string
  default     = "amphi"
}

variable "media_bucket_name" {
  description = "Name of the private S3 bucket for LL-HLS parts and segments (globally unique)."
  type        = string
}

variable "log_bucket_name" {
  description = "Name of the private S3 bucket receiving CloudFront standard logs (globally unique)."
  type        = string
}

variable "packager_hostname" {
  description = "Host name of the packager origin (HTTPS) that serves playlists with blocking reload."
  type        = string
}

variable "aliases" {
  description = "Host names of the distribution (e.g. [\"hls.example.com\"])."
  type        = list(string)
}

variable "certificate_arn" {
  description = "ACM certificate in us-east-1 covering the aliases."
  type        = string
}

variable "web_acl_arn" {
  description = "ARN of a WAFv2 web ACL (scope CLOUDFRONT) attached to the distribution."
  type        = string
}

variable "price_class" {
  description = "CloudFront price class (PriceClass_All reaches every listener region, including ap-southeast)."
  type        = string
  default     = "PriceClass_All"
}

variable "playlist_max_ttl" {
  description = "Longest time (seconds) CloudFront may cache a playlist; LL-HLS needs about one part duration."
  type        = number
  default     = 1
}

variable "media_ttl" {
  description = "Cache lifetime (seconds) of parts and segments, which never change once published."
  type        = number
  default     = 86400
}

variable "media_retention_days" {
  description = "Days parts and segments stay in the bucket (recordings included) before they expire."
  type        = number
  default     = 30
}

variable "log_retention_days" {
  description = "Days CloudFront logs are kept."
  type        = number
  default     = 365
}

variable "cors_allowed_origins" {
  description = "Origins allowed to fetch HLS from browsers (hls.js); [\"*\"] for any web page."
  type        = list(string)
  default     = ["*"]
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}
