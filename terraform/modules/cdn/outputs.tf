output "distribution_id" {
  description = "ID of the CloudFront distribution (for invalidations and metrics)."
  value       = aws_cloudfront_distribution.this.id
}

output "distribution_domain_name" {
  description = "CloudFront domain name: point the aliases at it."
  value       = aws_cloudfront_distribution.this.domain_name
}

output "distribution_zone_id" {
  description = "Route 53 zone of the distribution (for alias records)."
  value       = aws_cloudfront_distribution.this.hosted_zone_id
}

output "hls_base_url" {
  description = "Base URL of the HLS tier: players fetch <this>/hls/{room}/index.m3u8."
  value       = "https://${var.aliases[0]}"
}

output "media_bucket_name" {
  description = "Name of the media bucket (the packagers' upload target)."
  value       = aws_s3_bucket.media.bucket
}

output "media_bucket_arn" {
  description = "ARN of the media bucket."
  value       = aws_s3_bucket.media.arn
}

output "log_bucket_name" {
  description = "Name of the CloudFront log bucket."
  value       = aws_s3_bucket.logs.bucket
}
