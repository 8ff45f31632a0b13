# The listener tier: a private S3 bucket for parts and segments and a CloudFront distribution.
# Playlists go to the packager origin (short TTL, blocking-reload query parameters in the cache
# key); parts and segments go to an origin group: S3 through origin access control (long TTL),
# failing over to the packager when S3 does not have the object yet (a preload-hinted part the
# packager holds until it is published); init segments go to S3.

locals {
  tags            = merge(var.tags, { "amphi:role" = "cdn" })
  s3_origin       = "media-s3"
  packager_origin = "packager"
  media_group     = "media-s3-then-packager"
}

# --- media bucket --------------------------------------------------------------------------

resource "aws_s3_bucket" "media" {
  #checkov:skip=CKV_AWS_18:Every read goes through CloudFront, whose standard logs (log bucket below) record it; S3 server access logs would duplicate them at 10^6 listeners.
  #checkov:skip=CKV_AWS_144:Live parts expire within days; a packager republishes nothing, so cross-region replication would only double the write cost.
  #checkov:skip=CKV_AWS_145:SSE-S3 (AES-256) is on; SSE-KMS would add a KMS request to every CloudFront cache fill of every part.
  #checkov:skip=CKV2_AWS_62:Nothing consumes bucket events; playlists are announced by the packager, not by S3.
  bucket = var.media_bucket_name
  tags   = local.tags
}

resource "aws_s3_bucket_public_access_block" "media" {
  bucket                  = aws_s3_bucket.media.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "media" {
  bucket = aws_s3_bucket.media.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_versioning" "media" {
  bucket = aws_s3_bucket.media.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "media" {
  bucket = aws_s3_bucket.media.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "media" {
  bucket = aws_s3_bucket.media.id

  rule {
    id     = "expire-media"
    status = "Enabled"
    filter {
      prefix = "hls/"
    }
    expiration {
      days = var.media_retention_days
    }
    noncurrent_version_expiration {
      noncurrent_days = 1
    }
  }

  rule {
    id     = "abort-incomplete-uploads"
    status = "Enabled"
    filter {
      prefix = ""
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }
}

data "aws_iam_policy_document" "media" {
  statement {
    sid       = "CloudFrontReadsMedia"
    actions   = ["s3:GetObject"]
    resources = ["${aws_s3_bucket.media.arn}/hls/*"]
    principals {
      type        = "Service"
      identifiers = ["cloudfront.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "AWS:SourceArn"
      values   = [aws_cloudfront_distribution.this.arn]
    }
  }
  statement {
    sid       = "TlsOnly"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.media.arn, "${aws_s3_bucket.media.arn}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "media" {
  bucket = aws_s3_bucket.media.id
  policy = data.aws_iam_policy_document.media.json
}

# --- log bucket ----------------------------------------------------------------------------

resource "aws_s3_bucket" "logs" {
  #checkov:skip=CKV_AWS_18:This is the log bucket; logging it into itself would loop.
  #checkov:skip=CKV_AWS_144:Access logs are kept in one region; losing a region's copy loses only logs.
  #checkov:skip=CKV_AWS_145:CloudFront log delivery supports SSE-S3 here; a CMK would need a key policy for the log delivery service in every account.
  #checkov:skip=CKV2_AWS_62:Nothing consumes log bucket events.
  bucket = var.log_bucket_name
  tags   = local.tags
}

resource "aws_s3_bucket_public_access_block" "logs" {
  bucket                  = aws_s3_bucket.logs.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

# CloudFront standard logging writes with ACLs, so the bucket must allow them for its owner.
resource "aws_s3_bucket_ownership_controls" "logs" {
  #checkov:skip=CKV2_AWS_65:CloudFront standard logging delivers log files with ACLs (awslogsdelivery); it fails on buckets with ACLs disabled.
  bucket = aws_s3_bucket.logs.id
  rule {
    object_ownership = "BucketOwnerPreferred"
  }
}

resource "aws_s3_bucket_versioning" "logs" {
  bucket = aws_s3_bucket.logs.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "logs" {
  bucket = aws_s3_bucket.logs.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "logs" {
  bucket = aws_s3_bucket.logs.id

  rule {
    id     = "expire-logs"
    status = "Enabled"
    filter {
      prefix = ""
    }
    expiration {
      days = var.log_retention_days
    }
    noncurrent_version_expiration {
      noncurrent_days = 7
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }
}

# --- CloudFront ----------------------------------------------------------------------------

resource "aws_cloudfront_origin_access_control" "media" {
  name                              = "${var.name_prefix}-media"
  description                       = "amphi CloudFront access to the media bucket"
  origin_access_control_origin_type = "s3"
  signing_behavior                  = "always"
  signing_protocol                  = "sigv4"
}

# Playlists: a short TTL, and the LL-HLS blocking-reload and delta-update parameters in the key
# (each _HLS_msn/_HLS_part pair names a different future playlist), and `sig`, the signed URL of
# a private recording (the packager checks it).
resource "aws_cloudfront_cache_policy" "playlists" {
  name        = "${var.name_prefix}-playlists"
  comment     = "LL-HLS playlists: short TTL, _HLS_msn/_HLS_part/_HLS_skip and sig in the cache key"
  min_ttl     = 0
  default_ttl = 1
  max_ttl     = var.playlist_max_ttl

  parameters_in_cache_key_and_forwarded_to_origin {
    enable_accept_encoding_gzip   = true
    enable_accept_encoding_brotli = true

    cookies_config {
      cookie_behavior = "none"
    }
    headers_config {
      header_behavior = "none"
    }
    query_strings_config {
      query_string_behavior = "whitelist"
      query_strings {
        items = ["_HLS_msn", "_HLS_part", "_HLS_skip", "sig"]
      }
    }
  }
}

# Parts and segments never change once written: cache them long, no query strings.
resource "aws_cloudfront_cache_policy" "media" {
  name        = "${var.name_prefix}-media"
  comment     = "CMAF parts, segments and init segments: immutable, long TTL"
  min_ttl     = var.media_ttl
  default_ttl = var.media_ttl
  max_ttl     = var.media_ttl

  parameters_in_cache_key_and_forwarded_to_origin {
    enable_accept_encoding_gzip   = false
    enable_accept_encoding_brotli = false

    cookies_config {
      cookie_behavior = "none"
    }
    headers_config {
      header_behavior = "none"
    }
    query_strings_config {
      query_string_behavior = "none"
    }
  }
}

resource "aws_cloudfront_response_headers_policy" "hls" {
  #checkov:skip=CKV_AWS_259:HSTS is sent (one year, subdomains); "preload" commits the whole domain to browser preload lists, which is the domain owner's call, not this module's.
  name    = "${var.name_prefix}-hls"
  comment = "CORS for hls.js players on other origins, and security headers"

  cors_config {
    access_control_allow_credentials = false
    access_control_max_age_sec       = 600
    origin_override                  = true

    access_control_allow_headers {
      items = ["*"]
    }
    access_control_allow_methods {
      items = ["GET", "HEAD", "OPTIONS"]
    }
    access_control_allow_origins {
      items = var.cors_allowed_origins
    }
  }

  security_headers_config {
    content_type_options {
      override = true
    }
    strict_transport_security {
      access_control_max_age_sec = 31536000
      include_subdomains         = true
      override                   = true
    }
    referrer_policy {
      referrer_policy = "strict-origin-when-cross-origin"
      override        = true
    }
  }
}

resource "aws_cloudfront_distribution" "this" {
  #checkov:skip=CKV_AWS_374:Rooms are worldwide; who may listen is decided by the room API, not by geography.
  #checkov:skip=CKV_AWS_305:The distribution serves only /hls/... playlists and media; there is no root document.
  #checkov:skip=CKV2_AWS_47:The web ACL is the caller's (web_acl_arn); which managed rule groups it holds is an account decision.
  enabled         = true
  is_ipv6_enabled = true
  http_version    = "http2and3"
  comment         = "amphi LL-HLS"
  aliases         = var.aliases
  price_class     = var.price_class
  web_acl_id      = var.web_acl_arn

  origin {
    origin_id                = local.s3_origin
    domain_name              = aws_s3_bucket.media.bucket_regional_domain_name
    origin_access_control_id = aws_cloudfront_origin_access_control.media.id
  }

  origin {
    origin_id   = local.packager_origin
    domain_name = var.packager_hostname

    custom_origin_config {
      http_port                = 80
      https_port               = 443
      origin_protocol_policy   = "https-only"
      origin_ssl_protocols     = ["TLSv1.2"]
      origin_read_timeout      = 30
      origin_keepalive_timeout = 60
    }
  }

  # Parts and segments: S3 first; S3 answers 403 (no s3:ListBucket) or 404 for an object not
  # stored yet, e.g. the preload-hinted part a player asks for ahead of time (rfc8216bis 6.2.6),
  # and CloudFront then asks the packager, which holds the request until the part is published
  # and serves it from memory.
  origin_group {
    origin_id = local.media_group

    failover_criteria {
      status_codes = [403, 404]
    }

    member {
      origin_id = local.s3_origin
    }

    member {
      origin_id = local.packager_origin
    }
  }

  # Playlists (media and multivariant): to the packager, which holds blocking reloads.
  ordered_cache_behavior {
    path_pattern               = "/hls/*.m3u8"
    target_origin_id           = local.packager_origin
    viewer_protocol_policy     = "redirect-to-https"
    allowed_methods            = ["GET", "HEAD", "OPTIONS"]
    cached_methods             = ["GET", "HEAD"]
    compress                   = true
    cache_policy_id            = aws_cloudfront_cache_policy.playlists.id
    response_headers_policy_id = aws_cloudfront_response_headers_policy.hls.id
  }

  # A recording's chapters: to the packager, which keeps them private (signed URLs) until the
  # host publishes the recording, like its playlists.
  ordered_cache_behavior {
    path_pattern               = "/hls/*/chapters.*"
    target_origin_id           = local.packager_origin
    viewer_protocol_policy     = "redirect-to-https"
    allowed_methods            = ["GET", "HEAD", "OPTIONS"]
    cached_methods             = ["GET", "HEAD"]
    compress                   = true
    cache_policy_id            = aws_cloudfront_cache_policy.playlists.id
    response_headers_policy_id = aws_cloudfront_response_headers_policy.hls.id
  }

  # Parts, segments and init segments (`.m4a`), and a published recording's `recording.m4a`
  # (written only when the host publishes; S3 answers its byte ranges): the origin group (S3,
  # then the packager for what S3 lacks yet).
  ordered_cache_behavior {
    path_pattern               = "/hls/*.m4a"
    target_origin_id           = local.media_group
    viewer_protocol_policy     = "redirect-to-https"
    allowed_methods            = ["GET", "HEAD", "OPTIONS"]
    cached_methods             = ["GET", "HEAD"]
    compress                   = false
    cache_policy_id            = aws_cloudfront_cache_policy.media.id
    response_headers_policy_id = aws_cloudfront_response_headers_policy.hls.id
  }

  # Parts and segments of recordings made before the packager named its files `.m4a`.
  ordered_cache_behavior {
    path_pattern               = "/hls/*.m4s"
    target_origin_id           = local.media_group
    viewer_protocol_policy     = "redirect-to-https"
    allowed_methods            = ["GET", "HEAD", "OPTIONS"]
    cached_methods             = ["GET", "HEAD"]
    compress                   = false
    cache_policy_id            = aws_cloudfront_cache_policy.media.id
    response_headers_policy_id = aws_cloudfront_response_headers_policy.hls.id
  }

  # Older recordings' init segments (`init.mp4`), anything else: from S3, cached long.
  ordered_cache_behavior {
    path_pattern               = "/hls/*"
    target_origin_id           = local.s3_origin
    viewer_protocol_policy     = "redirect-to-https"
    allowed_methods            = ["GET", "HEAD", "OPTIONS"]
    cached_methods             = ["GET", "HEAD"]
    compress                   = false
    cache_policy_id            = aws_cloudfront_cache_policy.media.id
    response_headers_policy_id = aws_cloudfront_response_headers_policy.hls.id
  }

  # Anything else (healthz, unknown paths) goes to the packager uncached.
  default_cache_behavior {
    target_origin_id           = local.packager_origin
    viewer_protocol_policy     = "redirect-to-https"
    allowed_methods            = ["GET", "HEAD", "OPTIONS"]
    cached_methods             = ["GET", "HEAD"]
    compress                   = true
    cache_policy_id            = aws_cloudfront_cache_policy.playlists.id
    response_headers_policy_id = aws_cloudfront_response_headers_policy.hls.id
  }

  # Errors are never cached: a part asked for a few milliseconds early, or a blocking reload
  # that timed out (503), must not stick at the edge.
  dynamic "custom_error_response" {
    for_each = [400, 403, 404, 503]
    content {
      error_code            = custom_error_response.value
      error_caching_min_ttl = 0
    }
  }

  logging_config {
    bucket          = aws_s3_bucket.logs.bucket_domain_name
    include_cookies = false
    prefix          = "cloudfront/"
  }

  restrictions {
    geo_restriction {
      restriction_type = "none"
    }
  }

  viewer_certificate {
    acm_certificate_arn      = var.certificate_arn
    ssl_support_method       = "sni-only"
    minimum_protocol_version = "TLSv1.2_2021"
  }

  tags = local.tags
}
