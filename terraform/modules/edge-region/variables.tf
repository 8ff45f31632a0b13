variable "name_prefix" {
  description = "Prefix of every resource name (e.g. amphi-prod)."
  type        = string
  default     = "amphi"
}

variable "region_name" {
  description = "amphi region name of this edge group (the AWS region name, e.g. us-east-1); edges report it and the geo-router routes by it."
  type        = string
}

variable "vpc_cidr" {
  description = "CIDR block of the region's VPC."
  type        = string
}

variable "availability_zones" {
  description = "Availability zones to spread the edges over (one public subnet each)."
  type        = list(string)
}

variable "public_subnet_cidrs" {
  description = "One public subnet CIDR per availability zone, in the same order."
  type        = list(string)
}

variable "instance_type" {
  description = "EC2 instance type of the edge nodes (x86_64; the amphi binary is built for x86_64-unknown-linux-gnu)."
  type        = string
  default     = "c6i.xlarge"
}

variable "ami_id" {
  description = "AMI of the edge nodes; empty means the latest Debian 12 (bookworm) amd64 image."
  type        = string
  default     = ""
}

variable "min_size" {
  description = "Minimum number of edge nodes in the region."
  type        = number
  default     = 2
}

variable "max_size" {
  description = "Maximum number of edge nodes in the region (see docs/capacity.md for sizing)."
  type        = number
  default     = 20
}

variable "desired_capacity" {
  description = "Initial number of edge nodes (the autoscaling policy moves it between min and max)."
  type        = number
  default     = 2
}

variable "target_cpu_percent" {
  description = "Average CPU utilisation the target-tracking scaling policy keeps the group at."
  type        = number
  default     = 60
}

variable "http_port" {
  description = "TCP port of the edge's HTTP listener (WHIP, WHEP, WebSocket, /metrics, /healthz) on the instances."
  type        = number
  default     = 8080
}

variable "media_port" {
  description = "UDP port of the edge's WebRTC media socket (one socket carries every peer)."
  type        = number
  default     = 3478
}

variable "tls_server_name" {
  description = "DNS name in the edges' mesh certificate (mesh_tls_secret_arn). With backend_tls, edges of a region pull push listeners' rooms from each other (the relay tree) over HTTPS at their private addresses and check this name on the certificate."
  type        = string
  default     = "edge.amphi.internal"
}

variable "webtransport_port" {
  description = "UDP port of the edge's WebTransport (HTTP/3) listener for push listeners, reached on each instance's public IPv4 with the edge's own short-lived certificate (its hash goes to clients through the geo-router); 0 turns it off (push over WebSocket only)."
  type        = number
  default     = 4433
}

variable "certificate_arn" {
  description = "ACM certificate (in this region) for the load balancer's TLS listener on 443."
  type        = string
}

variable "public_hostname" {
  description = "DNS name clients use to reach this region's edges (points at the load balancer); the edges' public URL is https://<this>."
  type        = string
}

variable "nlb_udp_listener" {
  description = "Also forward the media UDP port through the load balancer (source-IP affinity). Edges always advertise their own public IP in ICE candidates; enable this only for single-edge regions whose clients must use the load balancer address."
  type        = bool
  default     = false
}

variable "edge_index_base" {
  description = "First edge index (0..4095, the high 12 bits of participant ids) of this region; indexes must not overlap between regions."
  type        = number
}

variable "edge_index_span" {
  description = "Number of edge indexes reserved for this region, starting at edge_index_base (an edge picks base + private-address mod span)."
  type        = number
  default     = 48
}

variable "origins" {
  description = "Every origin (the origin module's `origins` output: id, QUIC address as IP:port, TLS server name). Edges link to all of them and relay each room to its owner among the healthy ones."
  type = list(object({
    id          = string
    addr        = string
    server_name = string
  }))

  validation {
    condition     = length(var.origins) > 0
    error_message = "At least one origin."
  }
}

variable "router_url" {
  description = "Base URL of the geo-router API (room existence checks), e.g. https://api.example.com."
  type        = string
}

variable "interactive_capacity" {
  description = "Most interactive (WebRTC receive) listeners one edge serves before new ones are sent to HLS (503 capacity)."
  type        = number
  default     = 500
}

variable "ice_connect_timeout_secs" {
  description = "Seconds a WebRTC session may take to connect (ICE + DTLS) after the edge's answer before it is dropped."
  type        = number
  default     = 15
}

variable "token_public_keys" {
  description = "Token verification keys (Ed25519 SPKI PEM) with their kid; edges accept tokens signed by any of them."
  type = list(object({
    kid = string
    pem = string
  }))
}

variable "mesh_tls_secret_arn" {
  description = "Secrets Manager secret holding the edge's mesh mTLS material as JSON {\"ca\", \"cert\", \"key\"} (PEM strings)."
  type        = string
}

variable "secret_region" {
  description = "AWS region of the Secrets Manager secrets (empty: this region)."
  type        = string
  default     = ""
}

variable "artifact_bucket" {
  description = "S3 bucket holding the amphi release binary."
  type        = string
}

variable "artifact_key" {
  description = "S3 key of the amphi release binary (x86_64 Linux)."
  type        = string
}

variable "artifact_region" {
  description = "AWS region of the artifact bucket."
  type        = string
}

variable "artifact_sha256" {
  description = "SHA-256 of the amphi binary; user data refuses any other file."
  type        = string
}

variable "media_threads" {
  description = "Media driver threads per edge (0: one per core, at most 16)."
  type        = number
  default     = 0
}

variable "backend_tls" {
  description = "Serve the edges' HTTP listener over TLS with their mesh certificate (the load balancer re-encrypts to it). NLB TLS target groups cannot be sticky, so a WHIP PATCH or DELETE may reach another edge of the region (it answers 404; the session ends on its ICE timeout); false keeps source-IP stickiness and plain HTTP inside the VPC."
  type        = bool
  default     = true
}

variable "capacity" {
  description = "Most WebRTC sessions one edge takes (reported in its heartbeats)."
  type        = number
  default     = 1000
}

variable "api_key_id" {
  description = "Id of the geo-router API key that signs the edges' heartbeats."
  type        = string
}

variable "api_key_secret_arn" {
  description = "Secrets Manager secret holding that API key's secret (a plain string, filled into the config at boot)."
  type        = string
}

variable "drain_grace_secs" {
  description = "Longest a draining edge (SIGTERM, scale-in) waits for its sessions to end, in seconds."
  type        = number
  default     = 300
}

variable "client_cidrs" {
  description = "CIDRs allowed to reach the edges' HTTPS and media ports (clients: normally everyone)."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

variable "monitoring_cidrs" {
  description = "CIDRs allowed to scrape the edges' /metrics on http_port directly (Prometheus)."
  type        = list(string)
  default     = []
}

variable "log_retention_days" {
  description = "Retention of the VPC flow logs in CloudWatch, in days."
  type        = number
  default     = 365
}

variable "deletion_protection" {
  description = "Protect the load balancer from deletion."
  type        = bool
  default     = true
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}
