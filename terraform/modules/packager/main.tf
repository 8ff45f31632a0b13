# The cdn-packagers: one set of packager_count instances, each linked to every origin and
# packaging every room from whichever origin owns it now (a room whose origin dies continues
# its HLS from the origin that takes it over), behind an HTTPS application load balancer that
# CloudFront uses as the playlist origin. They store parts, segments and playlists in the CDN's
# media bucket (under hls/) with the instance profile's credentials.

locals {
  name   = "${var.name_prefix}-packager"
  tags   = merge(var.tags, { "amphi:role" = "packager" })
  ami_id = var.ami_id != "" ? var.ami_id : data.aws_ssm_parameter.debian[0].value

  # arn:aws:s3:::NAME
  media_bucket_name = element(split(":::", var.media_bucket_arn), 1)
  # Static S3 keys (S3-compatible storage only), filled into the config at boot.
  config_secrets = var.storage_keys_secret_arns == null ? {} : {
    S3_ACCESS_KEY = var.storage_keys_secret_arns.access_key
    S3_SECRET_KEY = var.storage_keys_secret_arns.secret_key
  }
}

data "aws_region" "current" {}

data "aws_ssm_parameter" "debian" {
  count = var.ami_id == "" ? 1 : 0
  name  = "/aws/service/debian/release/bookworm/latest/amd64"
}

data "aws_ec2_managed_prefix_list" "cloudfront" {
  name = "com.amazonaws.global.cloudfront.origin-facing"
}

# --- security ------------------------------------------------------------------------------

resource "aws_security_group" "lb" {
  name        = "${local.name}-lb"
  description = "amphi packager load balancer: HTTPS from CloudFront and geo-routers"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = "${local.name}-lb" })
}

resource "aws_security_group_rule" "lb_cloudfront" {
  type              = "ingress"
  description       = "HTTPS from CloudFront origin-facing addresses"
  security_group_id = aws_security_group.lb.id
  protocol          = "tcp"
  from_port         = 443
  to_port           = 443
  prefix_list_ids   = [data.aws_ec2_managed_prefix_list.cloudfront.id]
}

resource "aws_security_group_rule" "lb_routers" {
  count             = length(var.router_cidrs) > 0 ? 1 : 0
  type              = "ingress"
  description       = "HTTPS from geo-routers proxying /hls/"
  security_group_id = aws_security_group.lb.id
  protocol          = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_blocks       = var.router_cidrs
}

resource "aws_security_group_rule" "lb_to_packager" {
  type                     = "egress"
  description              = "to the packagers' HTTPS origin"
  security_group_id        = aws_security_group.lb.id
  protocol                 = "tcp"
  from_port                = var.https_port
  to_port                  = var.https_port
  source_security_group_id = aws_security_group.packager.id
}

resource "aws_security_group" "packager" {
  name        = local.name
  description = "amphi packagers: HTTP origin behind the load balancer; QUIC out to the origins"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = local.name })
}

resource "aws_security_group_rule" "packager_from_lb" {
  type                     = "ingress"
  description              = "HTTPS origin from the load balancer"
  security_group_id        = aws_security_group.packager.id
  protocol                 = "tcp"
  from_port                = var.https_port
  to_port                  = var.https_port
  source_security_group_id = aws_security_group.lb.id
}

resource "aws_security_group_rule" "packager_metrics" {
  count             = length(var.monitoring_cidrs) > 0 ? 1 : 0
  type              = "ingress"
  description       = "Prometheus scrapes of /metrics"
  security_group_id = aws_security_group.packager.id
  protocol          = "tcp"
  from_port         = var.http_port
  to_port           = var.http_port
  cidr_blocks       = var.monitoring_cidrs
}

resource "aws_security_group_rule" "packager_quic" {
  type              = "egress"
  description       = "QUIC (mTLS) to the origins' program streams"
  security_group_id = aws_security_group.packager.id
  protocol          = "udp"
  from_port         = 1
  to_port           = 65535
  cidr_blocks       = [for o in var.origins : "${element(split(":", o.addr), 0)}/32"]
}

resource "aws_security_group_rule" "packager_https" {
  type              = "egress"
  description       = "HTTPS: S3, Secrets Manager, SSM"
  security_group_id = aws_security_group.packager.id
  protocol          = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_blocks       = ["0.0.0.0/0"]
}

resource "aws_security_group_rule" "packager_http" {
  type              = "egress"
  description       = "HTTP: Debian package mirrors at boot"
  security_group_id = aws_security_group.packager.id
  protocol          = "tcp"
  from_port         = 80
  to_port           = 80
  cidr_blocks       = ["0.0.0.0/0"]
}

# --- instances -----------------------------------------------------------------------------

data "aws_iam_policy_document" "assume_ec2" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "packager" {
  name               = local.name
  assume_role_policy = data.aws_iam_policy_document.assume_ec2.json
  tags               = local.tags
}

data "aws_iam_policy_document" "packager" {
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
  statement {
    sid       = "ListMedia"
    actions   = ["s3:ListBucket"]
    resources = [var.media_bucket_arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["hls/*"]
    }
  }
  statement {
    sid       = "WriteMedia"
    actions   = ["s3:PutObject", "s3:GetObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
    resources = ["${var.media_bucket_arn}/hls/*"]
  }
}

resource "aws_iam_role_policy" "packager" {
  name   = "amphi-packager"
  role   = aws_iam_role.packager.id
  policy = data.aws_iam_policy_document.packager.json
}

resource "aws_iam_role_policy_attachment" "ssm" {
  role       = aws_iam_role.packager.name
  policy_arn = "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

resource "aws_iam_instance_profile" "packager" {
  name = local.name
  role = aws_iam_role.packager.name
  tags = local.tags
}

resource "aws_instance" "packager" {
  #checkov:skip=CKV_AWS_88:The packager subnets are the region's public subnets; the security group admits only the load balancer (and monitoring), and the QUIC link to the origin is outbound.
  count                       = var.packager_count
  ami                         = local.ami_id
  instance_type               = var.instance_type
  subnet_id                   = var.subnet_ids[count.index % length(var.subnet_ids)]
  vpc_security_group_ids      = [aws_security_group.packager.id]
  iam_instance_profile        = aws_iam_instance_profile.packager.name
  associate_public_ip_address = true
  ebs_optimized               = true
  monitoring                  = true
  user_data_replace_on_change = true

  user_data = templatefile("${path.module}/../../templates/user_data.sh.tftpl", {
    role = "packager"
    config = templatefile("${path.module}/templates/packager.toml.tftpl", {
      id                  = "packager-${count.index + 1}"
      origins             = var.origins
      http_port           = var.http_port
      https_port          = var.https_port
      storage_bucket      = local.media_bucket_name
      storage_region      = data.aws_region.current.name
      storage_endpoint    = var.storage_endpoint
      storage_static_keys = var.storage_keys_secret_arns != null
      token_public_keys   = var.token_public_keys
    })
    unit               = file("${path.module}/../../../infra/systemd/amphi-packager.service")
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
    volume_size = var.data_volume_gb
    volume_type = "gp3"
    encrypted   = true
  }

  tags = merge(local.tags, { Name = "${local.name}-${count.index + 1}" })
}

# --- load balancer -------------------------------------------------------------------------

resource "aws_lb" "packager" {
  #checkov:skip=CKV_AWS_91:CloudFront logs every viewer request already (cdn module); the origin load balancer sees only CloudFront's cache fills.
  #checkov:skip=CKV2_AWS_28:Only CloudFront's origin-facing addresses (and the geo-routers) may connect; the WAF belongs on the CloudFront distribution.
  name                       = substr(local.name, 0, 32)
  load_balancer_type         = "application"
  internal                   = false
  subnets                    = var.subnet_ids
  security_groups            = [aws_security_group.lb.id]
  drop_invalid_header_fields = true
  enable_deletion_protection = var.deletion_protection
  # LL-HLS blocking playlist reloads are held open for up to three part targets.
  idle_timeout = 60
  tags         = local.tags
}

# The load balancer re-encrypts to the packagers' HTTPS listener (their mesh certificate).
resource "aws_lb_target_group" "packager" {
  name                 = substr(local.name, 0, 32)
  port                 = var.https_port
  protocol             = "HTTPS"
  vpc_id               = var.vpc_id
  target_type          = "instance"
  deregistration_delay = 30

  health_check {
    protocol = "HTTPS"
    path     = "/healthz"
    interval = 10
  }

  tags = local.tags
}

resource "aws_lb_target_group_attachment" "packager" {
  count            = var.packager_count
  target_group_arn = aws_lb_target_group.packager.arn
  target_id        = aws_instance.packager[count.index].id
  port             = var.https_port
}

resource "aws_lb_listener" "https" {
  load_balancer_arn = aws_lb.packager.arn
  port              = 443
  protocol          = "HTTPS"
  certificate_arn   = var.certificate_arn
  ssl_policy        = "ELBSecurityPolicy-TLS13-1-2-2021-06"

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.packager.arn
  }

  tags = local.tags
}
