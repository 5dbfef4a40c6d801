//! A memory limit for one process, as a container runtime sets it: a memory cgroup of its own
//! (v1 `memory.limit_in_bytes` with swap capped too, or v2 `memory.max` with `memory.swap.max`
//! 0), made under this test's own cgroup. Past the limit the kernel reclaims and then OOM-kills,
//! exactly what happens to an operator pod at its `resources.limits.memory`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub struct MemoryLimit {
    pub dir: PathBuf,
    v2: bool,
}

impl MemoryLimit {
    /// A fresh cgroup limited to `mib` MiB. Panics (the test fails, it never skips) when this
    /// machine gives the test no writable memory cgroup.
    pub fn new(mib: u64) -> MemoryLimit {
        let own = std::fs::read_to_string("/proc/self/cgroup").expect("reading /proc/self/cgroup");
        let name = format!("pbx-operator-test-{}", std::process::id());
        let (dir, v2) = if let Some(path) = own
            .lines()
            .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()))
        {
            (
                Path::new("/sys/fs/cgroup/memory")
                    .join(path.trim_start_matches('/'))
                    .join(&name),
                false,
            )
        } else {
            let path = own
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .expect("no memory cgroup (v1 or v2) in /proc/self/cgroup");
            (
                Path::new("/sys/fs/cgroup")
                    .join(path.trim_start_matches('/'))
                    .join(&name),
                true,
            )
        };
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).unwrap_or_else(|e| {
            panic!(
                "cannot make memory cgroup {} ({e}): the memory-limit test needs a writable cgroup",
                dir.display()
            )
        });
        let limit = mib * 1024 * 1024;
        let group = MemoryLimit { dir, v2 };
        if v2 {
            group.write("memory.max", &limit.to_string());
            // Without swap, the limit is the process's whole memory (absent when swap is off).
            if group.dir.join("memory.swap.max").exists() {
                group.write("memory.swap.max", "0");
            }
        } else {
            group.write("memory.limit_in_bytes", &limit.to_string());
            if group.dir.join("memory.memsw.limit_in_bytes").exists() {
                group.write("memory.memsw.limit_in_bytes", &limit.to_string());
            }
        }
        assert_eq!(group.limit_bytes(), limit, "the kernel kept another limit");
        group
    }

    fn write(&self, file: &str, value: &str) {
        std::fs::write(self.dir.join(file), value)
            .unwrap_or_else(|e| panic!("writing {value} to {}/{file}: {e}", self.dir.display()));
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file))
            .unwrap_or_else(|e| panic!("reading {}/{file}: {e}", self.dir.display()))
    }

    /// The limit in force, read back from the kernel.
    pub fn limit_bytes(&self) -> u64 {
        let file = if self.v2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        self.read(file).trim().parse().unwrap_or(u64::MAX)
    }

    /// The file a process writes its pid into to join.
    pub fn procs_file(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    pub fn members(&self) -> Vec<u32> {
        self.read("cgroup.procs")
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Highest memory use the kernel charged to the group (v2 before 5.19 has no record: NaN).
    pub fn peak_mib(&self) -> f64 {
        let file = if self.v2 {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        };
        std::fs::read_to_string(self.dir.join(file))
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|b| b / 1024.0 / 1024.0)
            .unwrap_or(f64::NAN)
    }

    /// Processes of the group the OOM killer killed.
    pub fn oom_kills(&self) -> u64 {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        self.read(file)
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for MemoryLimit {
    fn drop(&mut self) {
        // Empty once its processes are gone; a leftover is harmless and named by this pid.
        let _ = std::fs::remove_dir(&self.dir);
    }
}
