output "origin_hostname" {
  description = "Host name CloudFront and the geo-routers use for the packager origin."
  value       = var.public_hostname
}

output "packager_url" {
  description = "Base URL of the packager origin (the geo-router's packager_url)."
  value       = "https://${var.public_hostname}"
}

output "load_balancer_dns_name" {
  description = "DNS name of the packagers' load balancer: point public_hostname at it."
  value       = aws_lb.packager.dns_name
}

output "load_balancer_zone_id" {
  description = "Route 53 zone of the load balancer (for alias records)."
  value       = aws_lb.packager.zone_id
}

output "private_ips" {
  description = "Private addresses of the packagers (Prometheus targets for :http_port)."
  value       = aws_instance.packager[*].private_ip
}

output "security_group_id" {
  description = "Security group of the packagers."
  value       = aws_security_group.packager.id
}
