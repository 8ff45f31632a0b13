# One region's edge group: a VPC with public subnets, an autoscaling group of `amphi edge` nodes,
# and a network load balancer in front of their HTTPS API (and optionally the media UDP port).

locals {
  name          = "${var.name_prefix}-edge-${var.region_name}"
  tags          = merge(var.tags, { "amphi:role" = "edge", "amphi:region" = var.region_name })
  secret_region = var.secret_region != "" ? var.secret_region : data.aws_region.current.name
  ami_id        = var.ami_id != "" ? var.ami_id : data.aws_ssm_parameter.debian[0].value
  # Every origin listens on the same QUIC port (the origin module's quic_port).
  origin_quic_port = tonumber(element(split(":", var.origins[0].addr), length(split(":", var.origins[0].addr)) - 1))

  edge_config = templatefile("${path.module}/templates/edge.toml.tftpl", {
    region                   = var.region_name
    http_port                = var.http_port
    media_port               = var.media_port
    webtransport_port        = var.webtransport_port
    public_url               = "https://${var.public_hostname}"
    origins                  = var.origins
    router_url               = var.router_url
    token_public_keys        = var.token_public_keys
    interactive_capacity     = var.interactive_capacity
    ice_connect_timeout_secs = var.ice_connect_timeout_secs
    media_threads            = var.media_threads
    backend_tls              = var.backend_tls
    tls_server_name          = var.tls_server_name
    capacity                 = var.capacity
    api_key_id               = var.api_key_id
    drain_grace_secs         = var.drain_grace_secs
    vpc_cidr                 = var.vpc_cidr
  })

  user_data = templatefile("${path.module}/../../templates/user_data.sh.tftpl", {
    role               = "edge"
    config             = local.edge_config
    unit               = file("${path.module}/../../../infra/systemd/amphi-edge.service")
    artifact_bucket    = var.artifact_bucket
    artifact_key       = var.artifact_key
    artifact_region    = var.artifact_region
    artifact_sha256    = var.artifact_sha256
    tls_secret_arn     = var.mesh_tls_secret_arn
    signing_secret_arn = ""
    secret_region      = local.secret_region
    index_base         = var.edge_index_base
    index_span         = var.edge_index_span
    config_secrets     = { API_KEY_SECRET = var.api_key_secret_arn }
    geoip_object_key   = ""
  })
}

data "aws_region" "current" {}

data "aws_ssm_parameter" "debian" {
  count = var.ami_id == "" ? 1 : 0
  name  = "/aws/service/debian/release/bookworm/latest/amd64"
}

# --- network -------------------------------------------------------------------------------

resource "aws_vpc" "this" {
  cidr_block           = var.vpc_cidr
  enable_dns_support   = true
  enable_dns_hostnames = true
  tags                 = merge(local.tags, { Name = local.name })
}

# Lock down the default security group: nothing uses it.
resource "aws_default_security_group" "this" {
  vpc_id = aws_vpc.this.id
  tags   = merge(local.tags, { Name = "${local.name}-default" })
}

resource "aws_internet_gateway" "this" {
  vpc_id = aws_vpc.this.id
  tags   = merge(local.tags, { Name = local.name })
}

resource "aws_subnet" "public" {
  count             = length(var.availability_zones)
  vpc_id            = aws_vpc.this.id
  cidr_block        = var.public_subnet_cidrs[count.index]
  availability_zone = var.availability_zones[count.index]
  tags              = merge(local.tags, { Name = "${local.name}-public-${var.availability_zones[count.index]}" })
}

resource "aws_route_table" "public" {
  vpc_id = aws_vpc.this.id
  tags   = merge(local.tags, { Name = "${local.name}-public" })
}

resource "aws_route" "internet" {
  route_table_id         = aws_route_table.public.id
  destination_cidr_block = "0.0.0.0/0"
  gateway_id             = aws_internet_gateway.this.id
}

resource "aws_route_table_association" "public" {
  count          = length(aws_subnet.public)
  subnet_id      = aws_subnet.public[count.index].id
  route_table_id = aws_route_table.public.id
}

resource "aws_cloudwatch_log_group" "flow" {
  #checkov:skip=CKV_AWS_158:Flow logs hold addresses and ports only; the CloudWatch default (AWS-owned key) encryption is enough and avoids a per-region CMK.
  name              = "/amphi/${local.name}/vpc-flow"
  retention_in_days = var.log_retention_days
  tags              = local.tags
}

data "aws_iam_policy_document" "flow_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["vpc-flow-logs.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "flow" {
  name               = "${local.name}-flow"
  assume_role_policy = data.aws_iam_policy_document.flow_assume.json
  tags               = local.tags
}

data "aws_iam_policy_document" "flow" {
  statement {
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"]
    resources = ["${aws_cloudwatch_log_group.flow.arn}:*"]
  }
}

resource "aws_iam_role_policy" "flow" {
  name   = "flow-logs"
  role   = aws_iam_role.flow.id
  policy = data.aws_iam_policy_document.flow.json
}

resource "aws_flow_log" "this" {
  vpc_id          = aws_vpc.this.id
  traffic_type    = "REJECT"
  log_destination = aws_cloudwatch_log_group.flow.arn
  iam_role_arn    = aws_iam_role.flow.arn
  tags            = local.tags
}

# --- security ------------------------------------------------------------------------------

resource "aws_security_group" "edge" {
  name        = local.name
  description = "amphi edge nodes: HTTPS API via the load balancer, WebRTC media UDP from clients"
  vpc_id      = aws_vpc.this.id
  tags        = merge(local.tags, { Name = local.name })
}

resource "aws_security_group_rule" "edge_http" {
  #checkov:skip=CKV_AWS_260:The edge API port must be open to clients (the NLB preserves client addresses); it serves WHIP/WHEP/WebSocket only with valid room tokens.
  type              = "ingress"
  description       = "edge HTTP (WHIP, WHEP, WebSocket) from clients through the load balancer"
  security_group_id = aws_security_group.edge.id
  protocol          = "tcp"
  from_port         = var.http_port
  to_port           = var.http_port
  cidr_blocks       = var.client_cidrs
}

resource "aws_security_group_rule" "edge_media" {
  type              = "ingress"
  description       = "WebRTC media (ICE, DTLS-SRTP) from clients"
  security_group_id = aws_security_group.edge.id
  protocol          = "udp"
  from_port         = var.media_port
  to_port           = var.media_port
  cidr_blocks       = var.client_cidrs
}

resource "aws_security_group_rule" "edge_webtransport" {
  count             = var.webtransport_port > 0 ? 1 : 0
  type              = "ingress"
  description       = "Push listeners over WebTransport (HTTP/3, QUIC) from clients"
  security_group_id = aws_security_group.edge.id
  protocol          = "udp"
  from_port         = var.webtransport_port
  to_port           = var.webtransport_port
  cidr_blocks       = var.client_cidrs
}

resource "aws_security_group_rule" "edge_metrics" {
  count             = length(var.monitoring_cidrs) > 0 ? 1 : 0
  type              = "ingress"
  description       = "Prometheus scrapes of /metrics"
  security_group_id = aws_security_group.edge.id
  protocol          = "tcp"
  from_port         = var.http_port
  to_port           = var.http_port
  cidr_blocks       = var.monitoring_cidrs
}

resource "aws_security_group_rule" "edge_egress_https" {
  type              = "egress"
  description       = "HTTPS: geo-router API, S3, Secrets Manager, SSM"
  security_group_id = aws_security_group.edge.id
  protocol          = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_blocks       = ["0.0.0.0/0"]
}

resource "aws_security_group_rule" "edge_egress_http" {
  type              = "egress"
  description       = "HTTP: Debian package mirrors at boot"
  security_group_id = aws_security_group.edge.id
  protocol          = "tcp"
  from_port         = 80
  to_port           = 80
  cidr_blocks       = ["0.0.0.0/0"]
}

resource "aws_security_group_rule" "edge_egress_quic" {
  type              = "egress"
  description       = "QUIC relay links to the origins (mTLS)"
  security_group_id = aws_security_group.edge.id
  protocol          = "udp"
  from_port         = local.origin_quic_port
  to_port           = local.origin_quic_port
  cidr_blocks       = [for o in var.origins : "${element(split(":", o.addr), 0)}/32"]
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

resource "aws_iam_role" "edge" {
  name               = local.name
  assume_role_policy = data.aws_iam_policy_document.assume_ec2.json
  tags               = local.tags
}

data "aws_iam_policy_document" "edge" {
  statement {
    sid       = "ReadRelease"
    actions   = ["s3:GetObject"]
    resources = ["arn:aws:s3:::${var.artifact_bucket}/${var.artifact_key}"]
  }
  statement {
    sid       = "ReadSecrets"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [var.mesh_tls_secret_arn, var.api_key_secret_arn]
  }
}

resource "aws_iam_role_policy" "edge" {
  name   = "amphi-edge"
  role   = aws_iam_role.edge.id
  policy = data.aws_iam_policy_document.edge.json
}

# Session Manager instead of SSH: no inbound port for operators.
resource "aws_iam_role_policy_attachment" "ssm" {
  role       = aws_iam_role.edge.name
  policy_arn = "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

resource "aws_iam_instance_profile" "edge" {
  name = local.name
  role = aws_iam_role.edge.name
  tags = local.tags
}

resource "aws_launch_template" "edge" {
  name_prefix   = "${local.name}-"
  image_id      = local.ami_id
  instance_type = var.instance_type
  user_data     = base64encode(local.user_data)
  ebs_optimized = true

  iam_instance_profile {
    arn = aws_iam_instance_profile.edge.arn
  }

  network_interfaces {
    #checkov:skip=CKV_AWS_88:Edges are WebRTC media endpoints: clients send ICE/DTLS/SRTP straight to each edge's public address.
    associate_public_ip_address = true
    security_groups             = [aws_security_group.edge.id]
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

resource "aws_autoscaling_group" "edge" {
  name                      = local.name
  min_size                  = var.min_size
  max_size                  = var.max_size
  desired_capacity          = var.desired_capacity
  vpc_zone_identifier       = aws_subnet.public[*].id
  health_check_type         = "ELB"
  health_check_grace_period = 180
  default_instance_warmup   = 120
  target_group_arns = concat(
    [aws_lb_target_group.http.arn],
    aws_lb_target_group.media[*].arn,
  )

  launch_template {
    id      = aws_launch_template.edge.id
    version = aws_launch_template.edge.latest_version
  }

  instance_refresh {
    strategy = "Rolling"
    preferences {
      min_healthy_percentage = 90
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

  lifecycle {
    ignore_changes = [desired_capacity]
  }
}

resource "aws_autoscaling_policy" "cpu" {
  name                   = "${local.name}-cpu"
  autoscaling_group_name = aws_autoscaling_group.edge.name
  policy_type            = "TargetTrackingScaling"

  target_tracking_configuration {
    predefined_metric_specification {
      predefined_metric_type = "ASGAverageCPUUtilization"
    }
    target_value = var.target_cpu_percent
  }
}

# --- load balancer -------------------------------------------------------------------------

resource "aws_lb" "edge" {
  #checkov:skip=CKV_AWS_91:NLB access logs cover TLS listeners only and would log every WHIP/WHEP request of 10^5 clients; edges export request metrics to Prometheus instead.
  name                             = substr(replace(local.name, "_", "-"), 0, 32)
  load_balancer_type               = "network"
  internal                         = false
  subnets                          = aws_subnet.public[*].id
  enable_cross_zone_load_balancing = true
  enable_deletion_protection       = var.deletion_protection
  tags                             = local.tags
}

resource "aws_lb_target_group" "http" {
  name                 = substr("${local.name}-http", 0, 32)
  port                 = var.http_port
  protocol             = var.backend_tls ? "TLS" : "TCP"
  vpc_id               = aws_vpc.this.id
  target_type          = "instance"
  deregistration_delay = 30

  # The same client should keep talking to the edge that holds its WHIP session (PATCH, DELETE);
  # NLB TLS target groups cannot be sticky (see backend_tls).
  stickiness {
    enabled = !var.backend_tls
    type    = "source_ip"
  }

  health_check {
    protocol = var.backend_tls ? "HTTPS" : "HTTP"
    port     = "traffic-port"
    path     = "/healthz"
    interval = 10
  }

  tags = local.tags
}

resource "aws_lb_listener" "https" {
  load_balancer_arn = aws_lb.edge.arn
  port              = 443
  protocol          = "TLS"
  certificate_arn   = var.certificate_arn
  ssl_policy        = "ELBSecurityPolicy-TLS13-1-2-2021-06"

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.http.arn
  }

  tags = local.tags
}

resource "aws_lb_target_group" "media" {
  count                = var.nlb_udp_listener ? 1 : 0
  name                 = substr("${local.name}-media", 0, 32)
  port                 = var.media_port
  protocol             = "UDP"
  vpc_id               = aws_vpc.this.id
  target_type          = "instance"
  deregistration_delay = 30

  stickiness {
    enabled = true
    type    = "source_ip"
  }

  # UDP cannot be health-checked directly: check the same node's HTTP API.
  health_check {
    protocol = var.backend_tls ? "HTTPS" : "HTTP"
    port     = tostring(var.http_port)
    path     = "/healthz"
    interval = 10
  }

  tags = local.tags
}

resource "aws_lb_listener" "media" {
  #checkov:skip=CKV_AWS_2:A UDP listener cannot use TLS; WebRTC media is DTLS-SRTP end to end.
  #checkov:skip=CKV_AWS_103:A UDP listener has no TLS policy; WebRTC media is DTLS-SRTP end to end.
  count             = var.nlb_udp_listener ? 1 : 0
  load_balancer_arn = aws_lb.edge.arn
  port              = var.media_port
  protocol          = "UDP"

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.media[0].arn
  }

  tags = local.tags
}
