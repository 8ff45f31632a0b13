output "api_url" {
  description = "Public base URL of the room API (latency-routed across router regions)."
  value       = "https://${var.api_hostname}"
}

output "load_balancer_dns_name" {
  description = "DNS name of this region's router load balancer."
  value       = aws_lb.router.dns_name
}

output "autoscaling_group_name" {
  description = "Name of the routers' autoscaling group."
  value       = aws_autoscaling_group.router.name
}

output "security_group_id" {
  description = "Security group of the routers."
  value       = aws_security_group.router.id
}

output "latency_record_fqdn" {
  description = "FQDN of this region's latency record."
  value       = aws_route53_record.api.fqdn
}
