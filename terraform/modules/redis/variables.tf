variable "name_prefix" {
  description = "Prefix of every resource name (e.g. amphi-prod)."
  type        = string
  default     = "amphi"
}

variable "vpc_id" {
  description = "VPC of the origin region."
  type        = string
}

variable "subnet_ids" {
  description = "Subnets (at least two availability zones) for the cache nodes."
  type        = list(string)
}

variable "client_cidrs" {
  description = "CIDRs allowed to connect (geo-routers and origins, including peered VPCs of other regions)."
  type        = list(string)
}

variable "node_type" {
  description = "ElastiCache node type."
  type        = string
  default     = "cache.t4g.medium"
}

variable "replicas" {
  description = "Read replicas besides the primary (at least 1: failover is always on)."
  type        = number
  default     = 1

  validation {
    condition     = var.replicas >= 1 && var.replicas <= 5
    error_message = "The replicas value must be 1 to 5 (automatic failover needs a replica)."
  }
}

variable "engine_version" {
  description = "Redis engine version."
  type        = string
  default     = "7.1"
}

variable "port" {
  description = "Redis port."
  type        = number
  default     = 6379
}

variable "auth_token" {
  description = "Redis AUTH token (16 to 128 printable characters); clients connect with rediss:// and this password."
  type        = string
  sensitive   = true

  validation {
    condition     = length(var.auth_token) >= 16 && length(var.auth_token) <= 128
    error_message = "The auth_token must be 16 to 128 characters."
  }
}

variable "kms_key_arn" {
  description = "KMS key for encryption at rest (empty: the AWS-managed ElastiCache key)."
  type        = string
  default     = ""
}

variable "snapshot_retention_days" {
  description = "Days automatic snapshots are kept (0 turns them off)."
  type        = number
  default     = 7
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}
