# ElastiCache Redis for the room directory and edge registry shared by geo-routers: TLS in
# transit, AUTH token, encryption at rest, a replica with automatic failover.

locals {
  name = "${var.name_prefix}-redis"
  tags = merge(var.tags, { "amphi:role" = "redis" })
}

resource "aws_elasticache_subnet_group" "this" {
  name       = local.name
  subnet_ids = var.subnet_ids
  tags       = local.tags
}

resource "aws_security_group" "redis" {
  name        = local.name
  description = "amphi Redis: TLS clients from geo-routers and origins"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = local.name })
}

resource "aws_security_group_rule" "clients" {
  type              = "ingress"
  description       = "Redis (TLS) from amphi nodes"
  security_group_id = aws_security_group.redis.id
  protocol          = "tcp"
  from_port         = var.port
  to_port           = var.port
  cidr_blocks       = var.client_cidrs
}

resource "aws_elasticache_replication_group" "this" {
  #checkov:skip=CKV_AWS_191:kms_key_arn selects a customer-managed key when the account wants one; the default is the AWS-managed ElastiCache key (still encrypted at rest).
  replication_group_id       = local.name
  description                = "amphi room directory and edge registry"
  engine                     = "redis"
  engine_version             = var.engine_version
  node_type                  = var.node_type
  port                       = var.port
  num_cache_clusters         = 1 + var.replicas
  automatic_failover_enabled = true
  multi_az_enabled           = true
  subnet_group_name          = aws_elasticache_subnet_group.this.name
  security_group_ids         = [aws_security_group.redis.id]
  at_rest_encryption_enabled = true
  kms_key_id                 = var.kms_key_arn != "" ? var.kms_key_arn : null
  transit_encryption_enabled = true
  auth_token                 = var.auth_token
  snapshot_retention_limit   = var.snapshot_retention_days
  auto_minor_version_upgrade = true
  apply_immediately          = false
  tags                       = local.tags
}
