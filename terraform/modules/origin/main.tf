# The origins: fixed instances with Elastic IPs (edges and packagers are configured with their
# addresses, and rooms are hashed onto their ids, so they are not an autoscaling group).

locals {
  name   = "${var.name_prefix}-origin"
  tags   = merge(var.tags, { "amphi:role" = "origin" })
  ami_id = var.ami_id != "" ? var.ami_id : data.aws_ssm_parameter.debian[0].value

  # Secrets filled into the config at boot for their @NAME@ placeholders.
  config_secrets = var.redis_auth_secret_arn != "" ? { REDIS_AUTH_TOKEN = var.redis_auth_secret_arn } : {}
}

data "aws_region" "current" {}

data "aws_ssm_parameter" "debian" {
  count = var.ami_id == "" ? 1 : 0
  name  = "/aws/service/debian/release/bookworm/latest/amd64"
}

resource "aws_security_group" "origin" {
  name        = local.name
  description = "amphi origins: QUIC mesh from edges, packagers and geo-routers; metrics"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = local.name })
}

resource "aws_security_group_rule" "quic" {
  type              = "ingress"
  description       = "QUIC mesh (mTLS) from edges, packagers and geo-routers"
  security_group_id = aws_security_group.origin.id
  protocol          = "udp"
  from_port         = var.quic_port
  to_port           = var.quic_port
  cidr_blocks       = var.mesh_peer_cidrs
}

resource "aws_security_group_rule" "metrics" {
  count             = length(var.monitoring_cidrs) > 0 ? 1 : 0
  type              = "ingress"
  description       = "Prometheus scrapes of /metrics"
  security_group_id = aws_security_group.origin.id
  protocol          = "tcp"
  from_port         = var.metrics_port
  to_port           = var.metrics_port
  cidr_blocks       = var.monitoring_cidrs
}

resource "aws_security_group_rule" "egress_https" {
  type              = "egress"
  description       = "HTTPS: S3, Secrets Manager, SSM"
  security_group_id = aws_security_group.origin.id
  protocol          = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_blocks       = ["0.0.0.0/0"]
}

resource "aws_security_group_rule" "egress_http" {
  type              = "egress"
  description       = "HTTP: Debian package mirrors at boot"
  security_group_id = aws_security_group.origin.id
  protocol          = "tcp"
  from_port         = 80
  to_port           = 80
  cidr_blocks       = ["0.0.0.0/0"]
}

data "aws_iam_policy_document" "assume_ec2" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "origin" {
  name               = local.name
  assume_role_policy = data.aws_iam_policy_document.assume_ec2.json
  tags               = local.tags
}

data "aws_iam_policy_document" "origin" {
  statement {
    sid       = "ReadRelease"
    actions   = ["s3:GetObject"]
    resources = ["arn:aws:s3:::${var.artifact_bucket}/${var.artifact_key}"]
  }
  statement {
    sid       = "ReadMeshTls"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = concat([var.mesh_tls_secret_arn], values(local.config_secrets))
  }
}

resource "aws_iam_role_policy" "origin" {
  name   = "amphi-origin"
  role   = aws_iam_role.origin.id
  policy = data.aws_iam_policy_document.origin.json
}

resource "aws_iam_role_policy_attachment" "ssm" {
  role       = aws_iam_role.origin.name
  policy_arn = "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

resource "aws_iam_instance_profile" "origin" {
  name = local.name
  role = aws_iam_role.origin.name
  tags = local.tags
}

resource "aws_instance" "origin" {
  #checkov:skip=CKV_AWS_88:Origins are reached over QUIC from edges in other regions at their Elastic IPs; mTLS authenticates every peer.
  count                       = var.origin_count
  ami                         = local.ami_id
  instance_type               = var.instance_type
  subnet_id                   = var.subnet_ids[count.index % length(var.subnet_ids)]
  vpc_security_group_ids      = [aws_security_group.origin.id]
  iam_instance_profile        = aws_iam_instance_profile.origin.name
  associate_public_ip_address = true
  ebs_optimized               = true
  monitoring                  = true
  user_data_replace_on_change = true

  user_data = templatefile("${path.module}/../../templates/user_data.sh.tftpl", {
    role = "origin"
    config = templatefile("${path.module}/templates/origin.toml.tftpl", {
      id                     = "origin-${count.index + 1}"
      quic_port              = var.quic_port
      metrics_port           = var.metrics_port
      idle_room_timeout_secs = var.idle_room_timeout_secs
      redis_url              = var.redis_url
    })
    unit               = file("${path.module}/../../../infra/systemd/amphi-origin.service")
    artifact_bucket    = var.artifact_bucket
    artifact_key       = var.artifact_key
    artifact_region    = var.artifact_region
    artifact_sha256    = var.artifact_sha256
    tls_secret_arn     = var.mesh_tls_secret_arn
    signing_secret_arn = ""
    secret_region      = data.aws_region.current.name
    index_base         = 0
    index_span         = 1
    config_secrets     = local.config_secrets
    geoip_object_key   = ""
  })

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  root_block_device {
    volume_size = 16
    volume_type = "gp3"
    encrypted   = true
  }

  tags = merge(local.tags, { Name = "${local.name}-${count.index + 1}" })
}

resource "aws_eip" "origin" {
  count    = var.origin_count
  domain   = "vpc"
  instance = aws_instance.origin[count.index].id
  tags     = merge(local.tags, { Name = "${local.name}-${count.index + 1}" })
}
