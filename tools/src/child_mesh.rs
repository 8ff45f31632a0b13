//! Child processes for benchmarks and load generators: an `amphi dev` mesh on loopback (the
//! `amphi` binary beside this one, or `$AMPHI_BIN`), and a guard that stops a child with SIGTERM
//! (then SIGKILL) when dropped.

use anyhow::{ensure, Context, Result};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process, stopped on drop: SIGTERM, up to 5 s to exit, then SIGKILL.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An `amphi dev` mesh in a child process, with its data and log in a scratch directory that is
/// removed on drop.
pub struct ChildMesh {
    /// Taken on drop, so the process stops before its directory is removed.
    child: Option<ChildGuard>,
    dir: PathBuf,
    offset: u16,
}

fn healthy(url: &str) -> bool {
    ureq::get(url)
        .timeout(Duration::from_secs(2))
        .call()
        .is_ok()
}

fn edge_connected(edge: &str) -> bool {
    ureq::get(&format!("{edge}/metrics"))
        .timeout(Duration::from_secs(2))
        .call()
        .ok()
        .and_then(|r| r.into_string().ok())
        .is_some_and(|m| m.contains("amphi_edge_origin_connected 1"))
}

impl ChildMesh {
    /// Start `amphi dev --port-offset offset` plus `extra` arguments and wait (blocking, at most
    /// 30 s) until the geo-router answers and the first edge is connected to the origin.
    pub fn start(name: &str, offset: u16, extra: &[&str]) -> Result<ChildMesh> {
        Self::start_with_env(name, offset, extra, &[])
    }

    /// [`ChildMesh::start`] with extra environment variables for the child.
    pub fn start_with_env(
        name: &str,
        offset: u16,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<ChildMesh> {
        let dir = std::env::temp_dir().join(format!("amphi-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let log = std::fs::File::create(dir.join("dev.log"))?;
        let child = Command::new(amphi_testkit::mesh::amphi_bin()?)
            .args(["dev", "--port-offset", &offset.to_string(), "--data-dir"])
            .arg(dir.join("data"))
            .args(extra)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting amphi dev")?;
        let mesh = ChildMesh {
            child: Some(ChildGuard(child)),
            dir,
            offset,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(healthy(&format!("{}/healthz", mesh.router_url()))
            && edge_connected(&mesh.edge_url(0)))
        {
            ensure!(
                Instant::now() < deadline,
                "amphi dev did not come up in 30 s (log: {})",
                mesh.dir.join("dev.log").display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(mesh)
    }

    /// The mesh process's id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, ChildGuard::pid)
    }

    /// The geo-router's base URL.
    pub fn router_url(&self) -> String {
        format!("http://127.0.0.1:{}", 8080 + self.offset)
    }

    /// Edge `i`'s HTTP base URL, in `--regions` order.
    pub fn edge_url(&self, i: u16) -> String {
        format!("http://127.0.0.1:{}", 8101 + i + self.offset)
    }
}

impl Drop for ChildMesh {
    fn drop(&mut self) {
        drop(self.child.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
