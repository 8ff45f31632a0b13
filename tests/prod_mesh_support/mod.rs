//! The namespace test bed from Rust: `scripts/mesh.sh up` on start, `down` on drop (also when a
//! test panics), clients run as `ip netns exec amb-<host> amphi-tools ...` printing JSON, and
//! HTTP fetches from inside a namespace with curl (the test process itself sits in the host's
//! namespace, which has no route to the bed).

#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// The running bed; torn down on drop.
pub struct Bed {
    /// Run directory (configs, logs, pids).
    pub run: PathBuf,
    tools: PathBuf,
    script: PathBuf,
    secret: String,
}

/// The geo-router's URL inside the bed.
pub const ROUTER: &str = "https://10.77.1.6:8080";

/// Public addresses the bed's GeoIP fixture places in each region (Seattle, Paris, Tokyo).
pub const US: &str = "216.160.83.1";
/// Paris -> eu-west-1.
pub const EU: &str = "81.2.69.1";
/// Tokyo -> ap-southeast-1.
pub const AP: &str = "175.16.199.1";

fn show(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

impl Bed {
    /// Bring the bed up under a fresh run directory for `name`; `None` (after printing why)
    /// when not root, the only reason to skip.
    pub fn up(name: &str) -> Option<Bed> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: the namespace test bed needs root (ip netns, iptables)");
            return None;
        }
        let amphi = PathBuf::from(env!("CARGO_BIN_EXE_amphi"));
        let tools = amphi.with_file_name("amphi-tools");
        assert!(
            tools.exists() && amphi.with_file_name("amphi-netem").exists(),
            "{} missing: cargo build -p amphi-tools first (scripts/test.sh does)",
            tools.display()
        );
        let run = std::env::temp_dir().join(format!("amphi-bed-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run);
        let mut bed = Bed {
            script: Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/mesh.sh"),
            run,
            tools,
            secret: String::new(),
        };
        let out = bed.mesh(&["up"]);
        if !out.status.success() {
            // Drop (down) runs after the panic message is built.
            panic!("mesh.sh up failed: {}\n{}", show(&out), bed.logs_tail());
        }
        bed.secret = std::fs::read_to_string(bed.run.join("api_secret")).unwrap();
        Some(bed)
    }

    /// Run `scripts/mesh.sh args` for this bed.
    pub fn mesh(&self, args: &[&str]) -> Output {
        Command::new("bash")
            .arg(&self.script)
            .args(args)
            .env("AMPHI_MESH_RUN", &self.run)
            .env("AMPHI_BIN", env!("CARGO_BIN_EXE_amphi"))
            .output()
            .expect("run scripts/mesh.sh")
    }

    /// The last lines of every role's log (for failure messages).
    pub fn logs_tail(&self) -> String {
        let mut out = String::new();
        if let Ok(dir) = std::fs::read_dir(self.run.join("logs")) {
            for e in dir.flatten() {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                out += &format!("--- {}\n", e.path().display());
                for l in &lines[lines.len().saturating_sub(8)..] {
                    out += l;
                    out.push('\n');
                }
            }
        }
        out
    }

    fn tools_cmd(&self, host: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &netns(host)])
            .arg(&self.tools)
            .args(args)
            .env("AMB_API_SECRET", &self.secret)
            .env("AMB_CA", self.run.join("ca.pem"));
        c
    }

    /// Run `amphi-tools args` in `host`'s namespace; its JSON output.
    pub fn tools(&self, host: &str, args: &[&str]) -> serde_json::Value {
        let out = self
            .tools_cmd(host, args)
            .output()
            .expect("run amphi-tools");
        assert!(
            out.status.success(),
            "amphi-tools {args:?} in {host}: {}",
            show(&out)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(&out)))
    }

    /// [`Bed::tools`] that reports a failed run instead of panicking (for polling).
    pub fn tools_output(&self, host: &str, args: &[&str]) -> Result<serde_json::Value, String> {
        let out = self
            .tools_cmd(host, args)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(show(&out));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {}", show(&out)))
    }

    /// Start `amphi-tools args` in `host`'s namespace; collect it with [`Bed::finish`].
    pub fn spawn(&self, host: &str, args: &[&str]) -> Child {
        self.tools_cmd(host, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn amphi-tools")
    }

    /// Wait for a spawned client; its JSON output.
    pub fn finish(&self, child: Child, what: &str) -> serde_json::Value {
        let out = child.wait_with_output().expect("wait for amphi-tools");
        assert!(
            out.status.success(),
            "{what}: {}\n{}",
            show(&out),
            self.logs_tail()
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{what}: {e}: {}", show(&out)))
    }

    /// A signed router API call from the us-east-1 client: (status, body).
    pub fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u64, serde_json::Value) {
        let url = format!("{ROUTER}{path}");
        let body = body.map(|b| b.to_string());
        let mut args = vec!["api", method, &url];
        if let Some(b) = &body {
            args.extend(["--body", b]);
        }
        // A signature covers the second it was made in, and the router accepts each signed
        // request once: the same call repeated within a second (a poll) is signed again in the
        // next one, as a real client does.
        for _ in 0..3 {
            let v = self.tools("client-use1", &args);
            let status = v["status"].as_u64().unwrap_or(0);
            if !(status == 401 && v["body"]["error"] == "replayed_request") {
                return (status, v["body"].clone());
            }
            std::thread::sleep(std::time::Duration::from_millis(
                1_000 - u64::from(unix_subsec_ms()),
            ));
        }
        panic!("{method} {path}: refused as a replay three times in a row");
    }

    /// A token for `role` in `room`.
    pub fn token(&self, room: &str, role: &str, name: &str) -> String {
        let (status, v) = self.api(
            "POST",
            &format!("/v1/rooms/{room}/tokens"),
            Some(serde_json::json!({"role": role, "name": name, "user_id": name})),
        );
        assert_eq!(status, 200, "{v}");
        v["token"].as_str().unwrap().to_string()
    }

    /// GET `url` from inside `host`'s namespace (curl, trusting the bed's CA); `None` on any
    /// failure.
    pub fn get(&self, host: &str, url: &str) -> Option<Vec<u8>> {
        let ca = self.run.join("ca.pem");
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &netns(host),
                "curl",
                "-fsS",
                "-m",
                "10",
                "--cacert",
                &ca.display().to_string(),
                url,
            ])
            .output()
            .ok()?;
        out.status.success().then_some(out.stdout)
    }

    /// Whether the process the bed started as `name` is still running.
    pub fn running(&self, name: &str) -> bool {
        std::fs::read_to_string(self.run.join("pids").join(format!("{name}.pid")))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let out = self.mesh(&["down"]);
        if !out.status.success() {
            eprintln!("mesh.sh down: {}", show(&out));
        } else if !std::thread::panicking() {
            // Keep configs and logs of a failed run for inspection.
            let _ = std::fs::remove_dir_all(&self.run);
        }
    }
}

/// The namespace of bed host `host` (prefix `AMPHI_MESH_PREFIX`, default `amb-`, as
/// `scripts/mesh.sh` names them).
fn netns(host: &str) -> String {
    let prefix = std::env::var("AMPHI_MESH_PREFIX")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "amb-".to_string());
    format!("{prefix}{host}")
}

/// Client arguments shared by speakers and listeners.
pub fn client_args<'a>(room: &'a str, token: &'a str, place: &'a str) -> Vec<&'a str> {
    vec![
        "--router",
        ROUTER,
        "--room",
        room,
        "--token",
        token,
        "--forwarded-for",
        place,
    ]
}

/// Unix ms values of a JSON array.
pub fn times(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
        .unwrap_or_default()
}

/// For each speaker onset, the delay to the listener's first onset within 600 ms after it.
pub fn delays(spoken: &[f64], heard: &[f64]) -> Vec<f64> {
    spoken
        .iter()
        .filter_map(|s| {
            heard
                .iter()
                .map(|h| h - s)
                .find(|d| (0.0..600.0).contains(d))
        })
        .collect()
}

/// Median (of a non-empty slice).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A WebSocket signaling session in `host`'s namespace (see `amphi-tools ws`).
pub fn ws_args<'a>(
    room: &'a str,
    token: &'a str,
    place: &'a str,
    send: &[&'a str],
    seconds: &'a str,
) -> Vec<&'a str> {
    let mut args = vec!["ws", "--seconds", seconds];
    for s in send {
        args.extend(["--send", s]);
    }
    args.extend(client_args(room, token, place));
    args
}

/// The room state a fresh listener joining now gets (`None` while the join is not answered).
pub fn fresh_state(bed: &Bed, room: &str, name: &str) -> Option<serde_json::Value> {
    let token = bed.token(room, "listener", name);
    let out = bed
        .tools_output("client-use1", &ws_args(room, &token, US, &[], "1"))
        .ok()?;
    (out["answer"]["type"] == "snapshot").then(|| out["answer"]["state"].clone())
}

/// The participant named `name` in a room state.
pub fn participant<'a>(state: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    state["participants"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)
}

/// Milliseconds into the current wall-clock second.
fn unix_subsec_ms() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_millis())
}
