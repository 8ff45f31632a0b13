output "vpc_id" {
  description = "ID of the region's VPC."
  value       = aws_vpc.this.id
}

output "vpc_cidr" {
  description = "CIDR block of the region's VPC."
  value       = aws_vpc.this.cidr_block
}

output "public_subnet_ids" {
  description = "IDs of the public subnets, one per availability zone."
  value       = aws_subnet.public[*].id
}

output "public_route_table_id" {
  description = "Route table of the public subnets (add peering routes to it)."
  value       = aws_route_table.public.id
}

output "edge_security_group_id" {
  description = "Security group of the edge nodes."
  value       = aws_security_group.edge.id
}

output "autoscaling_group_name" {
  description = "Name of the edges' autoscaling group."
  value       = aws_autoscaling_group.edge.name
}

output "load_balancer_dns_name" {
  description = "DNS name of the edges' network load balancer: point public_hostname at it."
  value       = aws_lb.edge.dns_name
}

output "load_balancer_zone_id" {
  description = "Route 53 zone of the load balancer (for alias records)."
  value       = aws_lb.edge.zone_id
}

output "public_url" {
  description = "Public base URL of the region's edges (what the geo-router hands to clients)."
  value       = "https://${var.public_hostname}"
}
