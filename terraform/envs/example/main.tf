# Five edge regions through provider aliases, one origin region (us-east-1) holding the origins,
# packagers, Redis and the CDN bucket, one CloudFront distribution, and geo-routers behind
# Route 53 latency records.

locals {
  artifact_region = "us-east-1"
  origin_region   = "us-east-1"

  regions = {
    "us-east-1" = {
      vpc_cidr   = "10.10.0.0/16"
      azs        = ["us-east-1a", "us-east-1b", "us-east-1c"]
      subnets    = ["10.10.0.0/20", "10.10.16.0/20", "10.10.32.0/20"]
      index_base = 0
    }
    "us-west-2" = {
      vpc_cidr   = "10.20.0.0/16"
      azs        = ["us-west-2a", "us-west-2b", "us-west-2c"]
      subnets    = ["10.20.0.0/20", "10.20.16.0/20", "10.20.32.0/20"]
      index_base = 800
    }
    "eu-west-1" = {
      vpc_cidr   = "10.30.0.0/16"
      azs        = ["eu-west-1a", "eu-west-1b", "eu-west-1c"]
      subnets    = ["10.30.0.0/20", "10.30.16.0/20", "10.30.32.0/20"]
      index_base = 1600
    }
    "ap-southeast-1" = {
      vpc_cidr   = "10.40.0.0/16"
      azs        = ["ap-southeast-1a", "ap-southeast-1b", "ap-southeast-1c"]
      subnets    = ["10.40.0.0/20", "10.40.16.0/20", "10.40.32.0/20"]
      index_base = 2400
    }
    "ap-southeast-2" = {
      vpc_cidr   = "10.50.0.0/16"
      azs        = ["ap-southeast-2a", "ap-southeast-2b", "ap-southeast-2c"]
      subnets    = ["10.50.0.0/20", "10.50.16.0/20", "10.50.32.0/20"]
      index_base = 3200
    }
  }

  # Latitude/longitude of each region, for the geo-router's nearest-edge choice.
  region_coordinates = {
    "us-east-1"      = { latitude = 38.95, longitude = -77.45 }
    "us-west-2"      = { latitude = 45.84, longitude = -119.7 }
    "eu-west-1"      = { latitude = 53.35, longitude = -6.26 }
    "ap-southeast-1" = { latitude = 1.29, longitude = 103.85 }
    "ap-southeast-2" = { latitude = -33.87, longitude = 151.21 }
  }

  edges = [for name, _ in local.regions : {
    id         = "edge-${name}"
    region     = name
    public_url = "https://edge-${name}.${var.domain}"
  }]

  api_hostname      = "api.${var.domain}"
  packager_hostname = "packager.${var.domain}"
  hls_hostname      = "hls.${var.domain}"
  router_url        = "https://${local.api_hostname}"
  # The routers' Redis URL; user data puts the AUTH token (from Secrets Manager) in at boot.
  router_redis_url = replace(module.redis.url, "rediss://", "rediss://:@REDIS_AUTH_TOKEN@@")
}

# --- edges: one group per region -----------------------------------------------------------

module "edge_us_east_1" {
  source    = "../../modules/edge-region"
  providers = { aws = aws.us_east_1 }

  name_prefix         = var.name_prefix
  region_name         = "us-east-1"
  vpc_cidr            = local.regions["us-east-1"].vpc_cidr
  availability_zones  = local.regions["us-east-1"].azs
  public_subnet_cidrs = local.regions["us-east-1"].subnets
  min_size            = var.edge_sizes["us-east-1"].min
  max_size            = var.edge_sizes["us-east-1"].max
  desired_capacity    = var.edge_sizes["us-east-1"].desired
  certificate_arn     = var.edge_certificate_arns["us-east-1"]
  public_hostname     = "edge-us-east-1.${var.domain}"
  edge_index_base     = local.regions["us-east-1"].index_base
  edge_index_span     = 800
  origins             = module.origin.origins
  router_url          = local.router_url
  token_public_keys   = var.token_public_keys
  api_key_id          = var.api_key_id
  api_key_secret_arn  = var.api_key_secret_arn
  mesh_tls_secret_arn = var.edge_tls_secret_arn
  secret_region       = local.origin_region
  artifact_bucket     = var.artifact_bucket
  artifact_key        = var.artifact_key
  artifact_region     = local.artifact_region
  artifact_sha256     = var.artifact_sha256
  monitoring_cidrs    = var.monitoring_cidrs
  tags                = var.tags
}

resource "aws_route53_record" "edge_us_east_1" {
  zone_id = var.zone_id
  name    = "edge-us-east-1.${var.domain}"
  type    = "A"

  alias {
    name                   = module.edge_us_east_1.load_balancer_dns_name
    zone_id                = module.edge_us_east_1.load_balancer_zone_id
    evaluate_target_health = true
  }
}

module "edge_us_west_2" {
  source    = "../../modules/edge-region"
  providers = { aws = aws.us_west_2 }

  name_prefix         = var.name_prefix
  region_name         = "us-west-2"
  vpc_cidr            = local.regions["us-west-2"].vpc_cidr
  availability_zones  = local.regions["us-west-2"].azs
  public_subnet_cidrs = local.regions["us-west-2"].subnets
  min_size            = var.edge_sizes["us-west-2"].min
  max_size            = var.edge_sizes["us-west-2"].max
  desired_capacity    = var.edge_sizes["us-west-2"].desired
  certificate_arn     = var.edge_certificate_arns["us-west-2"]
  public_hostname     = "edge-us-west-2.${var.domain}"
  edge_index_base     = local.regions["us-west-2"].index_base
  edge_index_span     = 800
  origins             = module.origin.origins
  router_url          = local.router_url
  token_public_keys   = var.token_public_keys
  api_key_id          = var.api_key_id
  api_key_secret_arn  = var.api_key_secret_arn
  mesh_tls_secret_arn = var.edge_tls_secret_arn
  secret_region       = local.origin_region
  artifact_bucket     = var.artifact_bucket
  artifact_key        = var.artifact_key
  artifact_region     = local.artifact_region
  artifact_sha256     = var.artifact_sha256
  monitoring_cidrs    = var.monitoring_cidrs
  tags                = var.tags
}

resource "aws_route53_record" "edge_us_west_2" {
  zone_id = var.zone_id
  name    = "edge-us-west-2.${var.domain}"
  type    = "A"

  alias {
    name                   = module.edge_us_west_2.load_balancer_dns_name
    zone_id                = module.edge_us_west_2.load_balancer_zone_id
    evaluate_target_health = true
  }
}

module "edge_eu_west_1" {
  source    = "../../modules/edge-region"
  providers = { aws = aws.eu_west_1 }

  name_prefix         = var.name_prefix
  region_name         = "eu-west-1"
  vpc_cidr            = local.regions["eu-west-1"].vpc_cidr
  availability_zones  = local.regions["eu-west-1"].azs
  public_subnet_cidrs = local.regions["eu-west-1"].subnets
  min_size            = var.edge_sizes["eu-west-1"].min
  max_size            = var.edge_sizes["eu-west-1"].max
  desired_capacity    = var.edge_sizes["eu-west-1"].desired
  certificate_arn     = var.edge_certificate_arns["eu-west-1"]
  public_hostname     = "edge-eu-west-1.${var.domain}"
  edge_index_base     = local.regions["eu-west-1"].index_base
  edge_index_span     = 800
  origins             = module.origin.origins
  router_url          = local.router_url
  token_public_keys   = var.token_public_keys
  api_key_id          = var.api_key_id
  api_key_secret_arn  = var.api_key_secret_arn
  mesh_tls_secret_arn = var.edge_tls_secret_arn
  secret_region       = local.origin_region
  artifact_bucket     = var.artifact_bucket
  artifact_key        = var.artifact_key
  artifact_region     = local.artifact_region
  artifact_sha256     = var.artifact_sha256
  monitoring_cidrs    = var.monitoring_cidrs
  tags                = var.tags
}

resource "aws_route53_record" "edge_eu_west_1" {
  zone_id = var.zone_id
  name    = "edge-eu-west-1.${var.domain}"
  type    = "A"

  alias {
    name                   = module.edge_eu_west_1.load_balancer_dns_name
    zone_id                = module.edge_eu_west_1.load_balancer_zone_id
    evaluate_target_health = true
  }
}

module "edge_ap_southeast_1" {
  source    = "../../modules/edge-region"
  providers = { aws = aws.ap_southeast_1 }

  name_prefix         = var.name_prefix
  region_name         = "ap-southeast-1"
  vpc_cidr            = local.regions["ap-southeast-1"].vpc_cidr
  availability_zones  = local.regions["ap-southeast-1"].azs
  public_subnet_cidrs = local.regions["ap-southeast-1"].subnets
  min_size            = var.edge_sizes["ap-southeast-1"].min
  max_size            = var.edge_sizes["ap-southeast-1"].max
  desired_capacity    = var.edge_sizes["ap-southeast-1"].desired
  certificate_arn     = var.edge_certificate_arns["ap-southeast-1"]
  public_hostname     = "edge-ap-southeast-1.${var.domain}"
  edge_index_base     = local.regions["ap-southeast-1"].index_base
  edge_index_span     = 800
  origins             = module.origin.origins
  router_url          = local.router_url
  token_public_keys   = var.token_public_keys
  api_key_id          = var.api_key_id
  api_key_secret_arn  = var.api_key_secret_arn
  mesh_tls_secret_arn = var.edge_tls_secret_arn
  secret_region       = local.origin_region
  artifact_bucket     = var.artifact_bucket
  artifact_key        = var.artifact_key
  artifact_region     = local.artifact_region
  artifact_sha256     = var.artifact_sha256
  monitoring_cidrs    = var.monitoring_cidrs
  tags                = var.tags
}

resource "aws_route53_record" "edge_ap_southeast_1" {
  zone_id = var.zone_id
  name    = "edge-ap-southeast-1.${var.domain}"
  type    = "A"

  alias {
    name                   = module.edge_ap_southeast_1.load_balancer_dns_name
    zone_id                = module.edge_ap_southeast_1.load_balancer_zone_id
    evaluate_target_health = true
  }
}

module "edge_ap_southeast_2" {
  source    = "../../modules/edge-region"
  providers = { aws = aws.ap_southeast_2 }

  name_prefix         = var.name_prefix
  region_name         = "ap-southeast-2"
  vpc_cidr            = local.regions["ap-southeast-2"].vpc_cidr
  availability_zones  = local.regions["ap-southeast-2"].azs
  public_subnet_cidrs = local.regions["ap-southeast-2"].subnets
  min_size            = var.edge_sizes["ap-southeast-2"].min
  max_size            = var.edge_sizes["ap-southeast-2"].max
  desired_capacity    = var.edge_sizes["ap-southeast-2"].desired
  certificate_arn     = var.edge_certificate_arns["ap-southeast-2"]
  public_hostname     = "edge-ap-southeast-2.${var.domain}"
  edge_index_base     = local.regions["ap-southeast-2"].index_base
  edge_index_span     = 800
  origins             = module.origin.origins
  router_url          = local.router_url
  token_public_keys   = var.token_public_keys
  api_key_id          = var.api_key_id
  api_key_secret_arn  = var.api_key_secret_arn
  mesh_tls_secret_arn = var.edge_tls_secret_arn
  secret_region       = local.origin_region
  artifact_bucket     = var.artifact_bucket
  artifact_key        = var.artifact_key
  artifact_region     = local.artifact_region
  artifact_sha256     = var.artifact_sha256
  monitoring_cidrs    = var.monitoring_cidrs
  tags                = var.tags
}

resource "aws_route53_record" "edge_ap_southeast_2" {
  zone_id = var.zone_id
  name    = "edge-ap-southeast-2.${var.domain}"
  type    = "A"

  alias {
    name                   = module.edge_ap_southeast_2.load_balancer_dns_name
    zone_id                = module.edge_ap_southeast_2.load_balancer_zone_id
    evaluate_target_health = true
  }
}

# --- origin region -------------------------------------------------------------------------

module "origin" {
  source = "../../modules/origin"

  name_prefix         = var.name_prefix
  origin_count        = var.origin_count
  vpc_id              = module.edge_us_east_1.vpc_id
  subnet_ids          = module.edge_us_east_1.public_subnet_ids
  server_name         = var.origin_server_name
  mesh_tls_secret_arn = var.origin_tls_secret_arn
  # Room state in Redis (database 1; the routers use 0), so a room that moves keeps its roles.
  redis_url             = "${local.router_redis_url}/1"
  redis_auth_secret_arn = var.redis_auth_secret_arn
  artifact_bucket       = var.artifact_bucket
  artifact_key          = var.artifact_key
  artifact_region       = local.artifact_region
  artifact_sha256       = var.artifact_sha256
  monitoring_cidrs      = var.monitoring_cidrs
  tags                  = var.tags
}

module "cdn" {
  source = "../../modules/cdn"

  name_prefix       = var.name_prefix
  media_bucket_name = var.media_bucket_name
  log_bucket_name   = var.log_bucket_name
  packager_hostname = local.packager_hostname
  aliases           = [local.hls_hostname]
  certificate_arn   = var.cloudfront_certificate_arn
  web_acl_arn       = var.cloudfront_web_acl_arn
  tags              = var.tags
}

module "packager" {
  source = "../../modules/packager"

  name_prefix         = var.name_prefix
  origins             = module.origin.origins
  token_public_keys   = var.token_public_keys
  vpc_id              = module.edge_us_east_1.vpc_id
  subnet_ids          = module.edge_us_east_1.public_subnet_ids
  certificate_arn     = var.packager_certificate_arn
  public_hostname     = local.packager_hostname
  router_cidrs        = ["0.0.0.0/0"]
  monitoring_cidrs    = var.monitoring_cidrs
  mesh_tls_secret_arn = var.packager_tls_secret_arn
  media_bucket_arn    = module.cdn.media_bucket_arn
  artifact_bucket     = var.artifact_bucket
  artifact_key        = var.artifact_key
  artifact_region     = local.artifact_region
  artifact_sha256     = var.artifact_sha256
  tags                = var.tags
}

resource "aws_route53_record" "packager" {
  zone_id = var.zone_id
  name    = local.packager_hostname
  type    = "A"

  alias {
    name                   = module.packager.load_balancer_dns_name
    zone_id                = module.packager.load_balancer_zone_id
    evaluate_target_health = true
  }
}

resource "aws_route53_record" "hls" {
  zone_id = var.zone_id
  name    = local.hls_hostname
  type    = "A"

  alias {
    name                   = module.cdn.distribution_domain_name
    zone_id                = module.cdn.distribution_zone_id
    evaluate_target_health = false
  }
}

# The Redis AUTH token lives in Secrets Manager: the cache is created with it, and the routers
# read it at boot (never in user data).
data "aws_secretsmanager_secret_version" "redis_auth" {
  secret_id = var.redis_auth_secret_arn
}

module "redis" {
  source = "../../modules/redis"

  name_prefix  = var.name_prefix
  vpc_id       = module.edge_us_east_1.vpc_id
  subnet_ids   = module.edge_us_east_1.public_subnet_ids
  client_cidrs = [module.edge_us_east_1.vpc_cidr]
  auth_token   = data.aws_secretsmanager_secret_version.redis_auth.secret_string
  tags         = var.tags
}

# --- geo-routers: latency-routed; us-east-1 always, the others with geo_router_all_regions ---

module "router_us_east_1" {
  source    = "../../modules/geo-router"
  providers = { aws = aws.us_east_1 }

  name_prefix           = var.name_prefix
  region_name           = "us-east-1"
  vpc_id                = module.edge_us_east_1.vpc_id
  subnet_ids            = module.edge_us_east_1.public_subnet_ids
  certificate_arn       = var.api_certificate_arns["us-east-1"]
  zone_id               = var.zone_id
  api_hostname          = local.api_hostname
  default_region        = "us-east-1"
  edges                 = local.edges
  region_coordinates    = local.region_coordinates
  origins               = module.origin.origins
  packager_url          = module.packager.packager_url
  hls_base_url          = module.cdn.hls_base_url
  trusted_proxies       = [module.edge_us_east_1.vpc_cidr]
  redis_url             = local.router_redis_url
  redis_auth_secret_arn = var.redis_auth_secret_arn
  api_key_id            = var.api_key_id
  api_key_secret_arn    = var.api_key_secret_arn
  signing_kid           = var.signing_kid
  geoip_object_key      = var.geoip_object_key
  signing_secret_arn    = var.signing_secret_arn
  mesh_tls_secret_arn   = var.router_tls_secret_arn
  secret_region         = local.origin_region
  artifact_bucket       = var.artifact_bucket
  artifact_key          = var.artifact_key
  artifact_region       = local.artifact_region
  artifact_sha256       = var.artifact_sha256
  monitoring_cidrs      = var.monitoring_cidrs
  tags                  = var.tags
}

module "router_us_west_2" {
  source    = "../../modules/geo-router"
  providers = { aws = aws.us_west_2 }
  count     = var.geo_router_all_regions ? 1 : 0

  name_prefix           = var.name_prefix
  region_name           = "us-west-2"
  vpc_id                = module.edge_us_west_2.vpc_id
  subnet_ids            = module.edge_us_west_2.public_subnet_ids
  certificate_arn       = var.api_certificate_arns["us-west-2"]
  zone_id               = var.zone_id
  api_hostname          = local.api_hostname
  default_region        = "us-east-1"
  edges                 = local.edges
  region_coordinates    = local.region_coordinates
  origins               = module.origin.origins
  packager_url          = module.packager.packager_url
  hls_base_url          = module.cdn.hls_base_url
  trusted_proxies       = [module.edge_us_west_2.vpc_cidr]
  redis_url             = local.router_redis_url
  redis_auth_secret_arn = var.redis_auth_secret_arn
  api_key_id            = var.api_key_id
  api_key_secret_arn    = var.api_key_secret_arn
  signing_kid           = var.signing_kid
  geoip_object_key      = var.geoip_object_key
  signing_secret_arn    = var.signing_secret_arn
  mesh_tls_secret_arn   = var.router_tls_secret_arn
  secret_region         = local.origin_region
  artifact_bucket       = var.artifact_bucket
  artifact_key          = var.artifact_key
  artifact_region       = local.artifact_region
  artifact_sha256       = var.artifact_sha256
  monitoring_cidrs      = var.monitoring_cidrs
  tags                  = var.tags
}

module "router_eu_west_1" {
  source    = "../../modules/geo-router"
  providers = { aws = aws.eu_west_1 }
  count     = var.geo_router_all_regions ? 1 : 0

  name_prefix           = var.name_prefix
  region_name           = "eu-west-1"
  vpc_id                = module.edge_eu_west_1.vpc_id
  subnet_ids            = module.edge_eu_west_1.public_subnet_ids
  certificate_arn       = var.api_certificate_arns["eu-west-1"]
  zone_id               = var.zone_id
  api_hostname          = local.api_hostname
  default_region        = "us-east-1"
  edges                 = local.edges
  region_coordinates    = local.region_coordinates
  origins               = module.origin.origins
  packager_url          = module.packager.packager_url
  hls_base_url          = module.cdn.hls_base_url
  trusted_proxies       = [module.edge_eu_west_1.vpc_cidr]
  redis_url             = local.router_redis_url
  redis_auth_secret_arn = var.redis_auth_secret_arn
  api_key_id            = var.api_key_id
  api_key_secret_arn    = var.api_key_secret_arn
  signing_kid           = var.signing_kid
  geoip_object_key      = var.geoip_object_key
  signing_secret_arn    = var.signing_secret_arn
  mesh_tls_secret_arn   = var.router_tls_secret_arn
  secret_region         = local.origin_region
  artifact_bucket       = var.artifact_bucket
  artifact_key          = var.artifact_key
  artifact_region       = local.artifact_region
  artifact_sha256       = var.artifact_sha256
  monitoring_cidrs      = var.monitoring_cidrs
  tags                  = var.tags
}

module "router_ap_southeast_1" {
  source    = "../../modules/geo-router"
  providers = { aws = aws.ap_southeast_1 }
  count     = var.geo_router_all_regions ? 1 : 0

  name_prefix           = var.name_prefix
  region_name           = "ap-southeast-1"
  vpc_id                = module.edge_ap_southeast_1.vpc_id
  subnet_ids            = module.edge_ap_southeast_1.public_subnet_ids
  certificate_arn       = var.api_certificate_arns["ap-southeast-1"]
  zone_id               = var.zone_id
  api_hostname          = local.api_hostname
  default_region        = "us-east-1"
  edges                 = local.edges
  region_coordinates    = local.region_coordinates
  origins               = module.origin.origins
  packager_url          = module.packager.packager_url
  hls_base_url          = module.cdn.hls_base_url
  trusted_proxies       = [module.edge_ap_southeast_1.vpc_cidr]
  redis_url             = local.router_redis_url
  redis_auth_secret_arn = var.redis_auth_secret_arn
  api_key_id            = var.api_key_id
  api_key_secret_arn    = var.api_key_secret_arn
  signing_kid           = var.signing_kid
  geoip_object_key      = var.geoip_object_key
  signing_secret_arn    = var.signing_secret_arn
  mesh_tls_secret_arn   = var.router_tls_secret_arn
  secret_region         = local.origin_region
  artifact_bucket       = var.artifact_bucket
  artifact_key          = var.artifact_key
  artifact_region       = local.artifact_region
  artifact_sha256       = var.artifact_sha256
  monitoring_cidrs      = var.monitoring_cidrs
  tags                  = var.tags
}

module "router_ap_southeast_2" {
  source    = "../../modules/geo-router"
  providers = { aws = aws.ap_southeast_2 }
  count     = var.geo_router_all_regions ? 1 : 0

  name_prefix           = var.name_prefix
  region_name           = "ap-southeast-2"
  vpc_id                = module.edge_ap_southeast_2.vpc_id
  subnet_ids            = module.edge_ap_southeast_2.public_subnet_ids
  certificate_arn       = var.api_certificate_arns["ap-southeast-2"]
  zone_id               = var.zone_id
  api_hostname          = local.api_hostname
  default_region        = "us-east-1"
  edges                 = local.edges
  region_coordinates    = local.region_coordinates
  origins               = module.origin.origins
  packager_url          = module.packager.packager_url
  hls_base_url          = module.cdn.hls_base_url
  trusted_proxies       = [module.edge_ap_southeast_2.vpc_cidr]
  redis_url             = local.router_redis_url
  redis_auth_secret_arn = var.redis_auth_secret_arn
  api_key_id            = var.api_key_id
  api_key_secret_arn    = var.api_key_secret_arn
  signing_kid           = var.signing_kid
  geoip_object_key      = var.geoip_object_key
  signing_secret_arn    = var.signing_secret_arn
  mesh_tls_secret_arn   = var.router_tls_secret_arn
  secret_region         = local.origin_region
  artifact_bucket       = var.artifact_bucket
  artifact_key          = var.artifact_key
  artifact_region       = local.artifact_region
  artifact_sha256       = var.artifact_sha256
  monitoring_cidrs      = var.monitoring_cidrs
  tags                  = var.tags
}
