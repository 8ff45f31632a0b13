output "origins" {
  description = "The origins as peers address them: id, QUIC address (Elastic IP:port) and TLS server name."
  value = [for i in range(var.origin_count) : {
    id          = "origin-${i + 1}"
    addr        = "${aws_eip.origin[i].public_ip}:${var.quic_port}"
    server_name = var.server_name
  }]
}

output "public_ips" {
  description = "Elastic IPs of the origins."
  value       = aws_eip.origin[*].public_ip
}

output "private_ips" {
  description = "Private addresses of the origins (Prometheus targets for :metrics_port)."
  value       = aws_instance.origin[*].private_ip
}

output "security_group_id" {
  description = "Security group of the origins."
  value       = aws_security_group.origin.id
}
