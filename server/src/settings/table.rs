//! The list of every setting, for `--help` and to tell known names.

/// Every setting: its name (the TOML key; the environment variable is
/// `SERVER_` and the name in upper case) and what it means.
pub const SETTINGS: &[(&str, &str)] = &[
    ("listen", "address to listen on; default 0.0.0.0:8080"),
    (
        "redis_sentinels",
        "comma-separated host:port of the sentinels (Sentinel discovery)",
    ),
    (
        "redis_master_name",
        "the master's name in Sentinel; default mymaster",
    ),
    (
        "redis_nodes",
        "comma-separated host:port of the data nodes, tried in order (without Sentinel)",
    ),
    (
        "redis_last_resort",
        "host:port tried when no candidate is the master (a load-balanced service)",
    ),
    ("redis_username", "Redis ACL user; default none"),
    ("redis_password", "Redis password; default none"),
    (
        "redis_sentinel_username",
        "ACL user on the sentinels; default none",
    ),
    (
        "redis_sentinel_password",
        "password of the sentinels (their requirepass); default none",
    ),
    (
        "redis_tls",
        "true to connect to Redis over TLS; default false",
    ),
    (
        "redis_tls_ca_file",
        "PEM file of the CA that signed Redis's certificates; default the system roots",
    ),
    (
        "redis_retry_budget",
        "how long a request may wait through a failover; default 8s",
    ),
    (
        "redis_wait_replicas",
        "replicas that must have each write before it is acknowledged (WAIT, 1s per try); default 0",
    ),
    (
        "redis_wait_replicas_min",
        "the fewest replicas writes wait for once one has been gone for redis_replica_lost_after; default redis_wait_replicas (always all)",
    ),
    (
        "redis_replica_lost_after",
        "how long the master must have been short of a replica before writes stop waiting for it (longer than a failover); default 8s",
    ),
    (
        "redis_demote_stale_master",
        "true to make a replaced master a replica as soon as it answers (needs REPLICAOF; Sentinel only); default false",
    ),
    (
        "jwt_algorithm",
        "HS256, HS384, HS512, RS256, RS384, RS512, ES256, ES384 or EdDSA; default HS256",
    ),
    ("jwt_secret", "HMAC secret for HS*, at least 32 bytes"),
    (
        "jwt_private_key_file",
        "PEM private key for RS*/ES*/EdDSA; without it, POST /token is off",
    ),
    ("jwt_public_key_file", "PEM public key for RS*/ES*/EdDSA"),
    ("jwt_issuer", "required `iss` of tokens, and the one issued"),
    (
        "jwt_audience",
        "required `aud` of tokens, and the one issued",
    ),
    ("jwt_ttl", "lifetime of issued tokens; default 30m"),
    (
        "jwt_leeway",
        "clock skew allowed on exp and nbf; default 5s",
    ),
    (
        "encryption_key",
        "64 hex digits: encrypt values at rest under this master key",
    ),
    (
        "cursor_secret",
        "secret signing listing cursors, shared by all instances; default random",
    ),
    (
        "loki_url",
        "Loki base URL: ship logs and audit records from this process",
    ),
    (
        "loki_job",
        "job label of the application's logs in Loki (audit records are job=audit_logs); default log-buffer",
    ),
    (
        "log_buffer",
        "false to keep logs out of Redis (stderr only); default true",
    ),
    ("max_body_bytes", "largest request body; default 1048576"),
    (
        "max_header_bytes",
        "largest request head (line and headers), at least 8192; default 16384",
    ),
    ("max_uri_bytes", "longest request target; default 8192"),
    ("max_batch", "most operations in one batch; default 100"),
    ("request_timeout", "time to answer a request; default 10s"),
    ("max_connections", "open connections at most; default 1024"),
    (
        "max_connections_per_address",
        "open connections at most from one client address (IPv6: its /64); 0 for no cap (behind a proxy); default 128",
    ),
    (
        "send_timeout",
        "time an answer may wait for the client to read any of it before the connection is closed; default 10s",
    ),
    (
        "body_timeout",
        "time a request body may stall once read (408 past it), shorter than request_timeout; default 5s, or half request_timeout if that is less",
    ),
    (
        "shutdown_grace",
        "time in-flight requests get to finish on shutdown; default 10s",
    ),
    (
        "admin_listen",
        "address serving /metrics and the probes (/healthz, /readyz), never the public one; `off` for none; default 127.0.0.1:9090",
    ),
    (
        "client_address_header",
        "header a trusted proxy puts the client's address in (x-forwarded-for: its last address; x-real-ip), for login throttling; default none: the peer's address",
    ),
    (
        "login_attempts_per_username",
        "login attempts a minute on one username from one client address (shared by every instance); 0 for no limit; default 10",
    ),
    (
        "login_attempts_per_username_total",
        "login attempts a minute on one username from every address: what it takes to lock a user out; 0 for no limit; default 100",
    ),
    (
        "login_attempts_per_address",
        "login attempts a minute from one client address; 0 for no limit; default 30",
    ),
    (
        "login_failed_records_per_minute",
        "login_failed audit records a minute per tenant, the rest counted in the next one; 0 for no limit; default 60",
    ),
    (
        "password_hashing_slots",
        "passwords checked at once (each takes 19 MiB and a core): the most of the machine logins can take; default half the cores, at least 1",
    ),
    (
        "password_hashing_queue",
        "logins waiting for a slot; past it, 503 at once; default 4 per slot",
    ),
    (
        "tenant_max_keys",
        "items a tenant may hold, unless overridden (`server tenant limits set`); default no limit",
    ),
    (
        "tenant_max_bytes",
        "bytes of keys, values and metadata a tenant may hold; default no limit",
    ),
    (
        "tenant_writes_per_second",
        "item writes per second of a tenant; default no limit",
    ),
    (
        "tenant_write_burst",
        "item writes of a tenant at once; default a second's worth",
    ),
    (
        "tenant_requests_per_second",
        "requests per second of a tenant (429 past it); default no limit",
    ),
    (
        "tenant_request_burst",
        "requests of a tenant at once; default a second's worth",
    ),
    (
        "tenant_api_key_requests_per_second",
        "requests per second of each API key without a rate of its own; default no limit",
    ),
    (
        "tenant_api_key_request_burst",
        "requests at once of each such API key; default a second's worth",
    ),
    (
        "tenant_max_api_keys",
        "API keys a tenant may hold; default 100",
    ),
];
