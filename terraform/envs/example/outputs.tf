output "api_url" {
  description = "Room API and web client (latency-routed geo-routers)."
  value       = module.router_us_east_1.api_url
}

output "hls_base_url" {
  description = "Base URL of the HLS tier (CloudFront)."
  value       = module.cdn.hls_base_url
}

output "edge_urls" {
  description = "Public base URL of each region's edges."
  value = {
    "us-east-1"      = module.edge_us_east_1.public_url
    "us-west-2"      = module.edge_us_west_2.public_url
    "eu-west-1"      = module.edge_eu_west_1.public_url
    "ap-southeast-1" = module.edge_ap_southeast_1.public_url
    "ap-southeast-2" = module.edge_ap_southeast_2.public_url
  }
}

output "origins" {
  description = "The origins (id, QUIC address, server name)."
  value       = module.origin.origins
}

output "redis_url" {
  description = "Redis connection URL (TLS; the password is the secret redis_auth_secret_arn)."
  value       = module.redis.url
}

output "prometheus_targets" {
  description = "Private addresses to scrape, by role (edges and routers are found by EC2 service discovery: see infra/prometheus)."
  value = {
    origin   = module.origin.private_ips
    packager = module.packager.private_ips
  }
}
