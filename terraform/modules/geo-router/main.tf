# One region's geo-routers: an autoscaling group behind an HTTPS application load balancer, and a
# Route 53 latency record so clients reach the nearest healthy router group.

locals {
  name          = "${var.name_prefix}-router-${var.region_name}"
  tags          = merge(var.tags, { "amphi:role" = "geo-router", "amphi:region" = var.region_name })
  secret_region = var.secret_region != "" ? var.secret_region : data.aws_region.current.name
  ami_id        = var.ami_id != "" ? var.ami_id : data.aws_ssm_parameter.debian[0].value

  router_config = templatefile("${path.module}/templates/router.toml.tftpl", {
    region          = var.region_name
    http_port       = var.http_port
    public_url      = "https://${var.api_hostname}"
    default_region  = var.default_region
    packager_url    = var.packager_url
    hls_base_url    = var.hls_base_url
    token_ttl_secs  = var.token_ttl_secs
    trusted_proxies = var.trusted_proxies
    redis_url       = var.redis_url
    api_key_id      = var.api_key_id
    edges           = var.edges
    coordinates     = var.region_coordinates
    origins         = var.origins
    signing_kid     = var.signing_kid
    geoip           = var.geoip_object_key != "" ? ["/var/lib/amphi/geoip/city.mmdb"] : []
  })

  # Secrets filled into the config at boot for their @NAME@ placeholders.
  config_secrets = merge(
    { API_KEY_SECRET = var.api_key_secret_arn },
    var.redis_auth_secret_arn != "" ? { REDIS_AUTH_TOKEN = var.redis_auth_secret_arn } : {},
  )
}

data "aws_region" "current" {}

data "aws_ssm_parameter" "debian" {
  count = var.ami_id == "" ? 1 : 0
  name  = "/aws/service/debian/release/bookworm/latest/amd64"
}

# --- security ------------------------------------------------------------------------------

resource "aws_security_group" "lb" {
  name        = "${local.name}-lb"
  description = "amphi geo-router load balancer: HTTPS from clients"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = "${local.name}-lb" })
}

resource "aws_security_group_rule" "lb_https" {
  type              = "ingress"
  description       = "HTTPS API and web client from everyone"
  security_group_id = aws_security_group.lb.id
  protocol          = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_blocks       = ["0.0.0.0/0"]
}

resource "aws_security_group_rule" "lb_to_router" {
  type                     = "egress"
  description              = "to the routers' HTTP listener"
  security_group_id        = aws_security_group.lb.id
  protocol                 = "tcp"
  from_port                = var.http_port
  to_port                  = var.http_port
  source_security_group_id = aws_security_group.router.id
}

resource "aws_security_group" "router" {
  name        = local.name
  description = "amphi geo-routers: HTTP from the load balancer; QUIC out to the origins"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = local.name })
}

resource "aws_security_group_rule" "router_from_lb" {
  type                     = "ingress"
  description              = "HTTP from the load balancer"
  security_group_id        = aws_security_group.router.id
  protocol                 = "tcp"
  from_port                = var.http_port
  to_port                  = var.http_port
  source_security_group_id = aws_security_group.lb.id
}

resource "aws_security_group_rule" "router_metrics" {
  count             = length(var.monitoring_cidrs) > 0 ? 1 : 0
  type              = "ingress"
  description       = "Prometheus scrapes of /metrics"
  security_group_id = aws_security_group.router.id
  protocol          = "tcp"
  from_port         = var.http_port
  to_port           = var.http_port
  cidr_blocks       = var.monitoring_cidrs
}

resource "aws_security_group_rule" "router_quic" {
  count             = length(var.origins) > 0 ? 1 : 0
  type              = "egress"
  description       = "QUIC (mTLS) to the origins"
  security_group_id = aws_security_group.router.id
  protocol          = "udp"
  from_port         = 1
  to_port           = 65535
  cidr_blocks       = [for o in var.origins : "${element(split(":", o.addr), 0)}/32"]
}

resource "aws_security_group_rule" "router_https" {
  type              = "egress"
  description       = "HTTPS: edges, packager origin, S3, Secrets Manager, SSM"
  security_group_id = aws_security_group.router.id
  protocol          = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_blocks       = ["0.0.0.0/0"]
}

resource "aws_security_group_rule" "router_http" {
  type              = "egress"
  description       = "HTTP: Debian package mirrors at boot"
  security_group_id = aws_security_group.router.id
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

resource "aws_iam_role" "router" {
  name               = local.name
  assume_role_policy = data.aws_iam_policy_document.assume_ec2.json
  tags               = local.tags
}

data "aws_iam_policy_document" "router" {
  statement {
    sid     = "ReadRelease"
    actions = ["s3:GetObject"]
    resources = concat(
      ["arn:aws:s3:::${var.artifact_bucket}/${var.artifact_key}"],
      var.geoip_object_key != "" ? ["arn:aws:s3:::${var.artifact_bucket}/${var.geoip_object_key}"] : [],
    )
  }
  statement {
    sid       = "ReadSecrets"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = concat([var.signing_secret_arn, var.mesh_tls_secret_arn], values(local.config_secrets))
  }
}

resource "aws_iam_role_policy" "router" {
  name   = "amphi-geo-router"
  role   = aws_iam_role.router.id
  policy = data.aws_iam_policy_document.router.json
}

resource "aws_iam_role_policy_attachment" "ssm" {
  role       = aws_iam_role.router.name
  policy_arn = "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

resource "aws_iam_instance_profile" "router" {
  name = local.name
  role = aws_iam_role.router.name
  tags = local.tags
}

resource "aws_launch_template" "router" {
  name_prefix   = "${local.name}-"
  image_id      = local.ami_id
  instance_type = var.instance_type
  ebs_optimized = true

  user_data = base64encode(templatefile("${path.module}/../../templates/user_data.sh.tftpl", {
    role               = "geo-router"
    config             = local.router_config
    unit               = file("${path.module}/../../../infra/systemd/amphi-geo-router.service")
    artifact_bucket    = var.artifact_bucket
    artifact_key       = var.artifact_key
    artifact_region    = var.artifact_region
    artifact_sha256    = var.artifact_sha256
    tls_secret_arn     = var.mesh_tls_secret_arn
    signing_secret_arn = var.signing_secret_arn
    secret_region      = local.secret_region
    index_base         = 0
    index_span         = 1
    config_secrets     = local.config_secrets
    geoip_object_key   = var.geoip_object_key
  }))

  iam_instance_profile {
    arn = aws_iam_instance_profile.router.arn
  }

  network_interfaces {
    #checkov:skip=CKV_AWS_88:The routers sit in the region's public subnets (no NAT gateway to pay for); their security group admits only the load balancer and monitoring.
    associate_public_ip_address = true
    security_groups             = [aws_security_group.router.id]
    delete_on_termination       = true
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  monitoring {
    enabled = true
  }

  block_device_mappings {
    device_name = "/dev/xvda"
    ebs {
      volume_size           = 16
      volume_type           = "gp3"
      encrypted             = true
      delete_on_termination = true
    }
  }

  tag_specifications {
    resource_type = "instance"
    tags          = merge(local.tags, { Name = local.name })
  }

  tags = local.tags

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_autoscaling_group" "router" {
  name                      = local.name
  min_size                  = var.min_size
  max_size                  = var.max_size
  vpc_zone_identifier       = var.subnet_ids
  health_check_type         = "ELB"
  health_check_grace_period = 180
  target_group_arns         = [aws_lb_target_group.router.arn]

  launch_template {
    id      = aws_launch_template.router.id
    version = aws_launch_template.router.latest_version
  }

  instance_refresh {
    strategy = "Rolling"
    preferences {
      min_healthy_percentage = 50
    }
  }

  dynamic "tag" {
    for_each = merge(local.tags, { Name = local.name })
    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = true
    }
  }
}

resource "aws_autoscaling_policy" "cpu" {
  name                   = "${local.name}-cpu"
  autoscaling_group_name = aws_autoscaling_group.router.name
  policy_type            = "TargetTrackingScaling"

  target_tracking_configuration {
    predefined_metric_specification {
      predefined_metric_type = "ASGAverageCPUUtilization"
    }
    target_value = 50
  }
}

# --- load balancer and DNS -----------------------------------------------------------------

resource "aws_lb" "router" {
  #checkov:skip=CKV_AWS_91:The router logs every API request with tracing (room ids, never tokens) and exports route metrics; ALB access logs would need a log bucket per region.
  #checkov:skip=CKV2_AWS_28:The room API enforces its own limits and tokens; a regional WAF web ACL is an account decision, attach one outside this module if wanted.
  name                       = substr(local.name, 0, 32)
  load_balancer_type         = "application"
  internal                   = false
  subnets                    = var.subnet_ids
  security_groups            = [aws_security_group.lb.id]
  drop_invalid_header_fields = true
  enable_deletion_protection = var.deletion_protection
  # WebSocket-free API, but /hls blocking reloads are proxied through the router.
  idle_timeout = 60
  tags         = local.tags
}

# The load balancer re-encrypts to the routers' HTTPS listener (their mesh certificate).
resource "aws_lb_target_group" "router" {
  name                 = substr(local.name, 0, 32)
  port                 = var.http_port
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

resource "aws_lb_listener" "https" {
  load_balancer_arn = aws_lb.router.arn
  port              = 443
  protocol          = "HTTPS"
  certificate_arn   = var.certificate_arn
  ssl_policy        = "ELBSecurityPolicy-TLS13-1-2-2021-06"

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.router.arn
  }

  tags = local.tags
}

resource "aws_route53_record" "api" {
  zone_id        = var.zone_id
  name           = var.api_hostname
  type           = "A"
  set_identifier = var.region_name

  latency_routing_policy {
    region = var.region_name
  }

  alias {
    name                   = aws_lb.router.dns_name
    zone_id                = aws_lb.router.zone_id
    evaluate_target_health = true
  }
}
