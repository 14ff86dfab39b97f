//! Finding leaders and workers in `/proc`: roles from process titles and parent links, identity
//! from `(pid, start time)`, CPU and start time from `stat`, memory through [`crate::memory`].
//!
//! The root is injectable ([`ProcSource::new`]) so unit tests run on fixture trees; production
//! reads `/proc`. Processes come and go while we read: a PID that vanishes mid-scan is skipped,
//! never an error for the caller, and every later read of a process re-checks its start time so
//! a reused PID is never taken for the process we saw.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use procfs::process::Process;

use crate::api::{LeaderView, Memory, ProcessList, ProcessView, ServerKind};
use crate::memory;

/// A process identity that survives PID reuse: the kernel never gives two processes the same
/// PID and start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProcessKey {
    /// The PID.
    pub pid: u32,
    /// `/proc/PID/stat` field 22, clock ticks since boot.
    pub start_ticks: u64,
}

/// The role a title gives a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Title {
    /// `forkscope-server: leader [APP]`.
    ForkscopeLeader {
        /// APP.
        app: String,
    },
    /// `forkscope-server: worker N [APP]`.
    ForkscopeWorker {
        /// N.
        slot: u32,
        /// APP.
        app: String,
    },
    /// `gunicorn: master [APP]` (setproctitle).
    GunicornMaster {
        /// APP (gunicorn's proc name).
        app: String,
    },
    /// `gunicorn: worker [APP]` (setproctitle).
    GunicornWorker {
        /// APP.
        app: String,
    },
    /// A Python interpreter running gunicorn without setproctitle: leader or worker by parent.
    GunicornPython {
        /// The WSGI app argument, when one is recognisable.
        app: String,
    },
    /// Anything else.
    Other,
}

/// Reads a bracketed app name: `[APP]` → `APP`.
fn bracketed(rest: &str) -> Option<String> {
    let inner = rest.strip_prefix('[')?.strip_suffix(']')?;
    Some(inner.to_owned())
}

/// Classifies a process from its command line (`argv`; a title set by setproctitle or by
/// forkscope-server is a single element, possibly containing spaces).
pub fn classify(argv: &[String]) -> Title {
    let joined = argv.join(" ");
    let title = joined.trim();
    if title.starts_with(forkscope_protocol::title::PREFIX) {
        return match forkscope_protocol::title::Title::parse(title) {
            Some(forkscope_protocol::title::Title::Leader { app }) => {
                Title::ForkscopeLeader { app }
            }
            Some(forkscope_protocol::title::Title::Worker { slot, app }) => {
                Title::ForkscopeWorker { slot, app }
            }
            None => Title::Other,
        };
    }
    if let Some(rest) = title.strip_prefix("gunicorn: ") {
        if let Some(app) = rest.strip_prefix("master ").and_then(bracketed) {
            return Title::GunicornMaster { app };
        }
        if let Some(app) = rest.strip_prefix("worker ").and_then(bracketed) {
            return Title::GunicornWorker { app };
        }
        return Title::Other;
    }
    gunicorn_python(argv)
}

/// `python .../gunicorn ARGS APP`, `python -m gunicorn ARGS APP` or `.../gunicorn ARGS APP`.
fn gunicorn_python(argv: &[String]) -> Title {
    let base = |s: &str| s.rsplit('/').next().unwrap_or(s).to_owned();
    let Some(first) = argv.first() else {
        return Title::Other;
    };
    let args_from = if base(first) == "gunicorn" {
        Some(1)
    } else if base(first).starts_with("python") {
        match argv.get(1).map(String::as_str) {
            Some("-m") if argv.get(2).is_some_and(|m| m == "gunicorn") => Some(3),
            Some(script) if base(script) == "gunicorn" => Some(2),
            _ => None,
        }
    } else {
        None
    };
    let Some(from) = args_from else {
        return Title::Other;
    };
    // The app is the last argument that looks like `module:callable`.
    let app = argv[from..]
        .iter()
        .rev()
        .find(|a| !a.starts_with('-') && a.contains(':') && !a.contains('/'))
        .cloned()
        .unwrap_or_default();
    Title::GunicornPython { app }
}

/// One live process with the fields discovery needs.
#[derive(Debug, Clone)]
pub struct Found {
    /// Identity.
    pub key: ProcessKey,
    /// Parent PID.
    pub ppid: u32,
    /// Command line joined with spaces.
    pub title: String,
    /// What the title says.
    pub class: Title,
    /// User + system time in clock ticks.
    pub cpu_ticks: u64,
}

/// A worker with its place in the tree.
#[derive(Debug, Clone)]
pub struct WorkerEntry {
    /// The process.
    pub process: Found,
    /// Slot (forkscope-server) or age rank (gunicorn).
    pub slot: u32,
}

/// A leader with its workers, as one scan saw them.
#[derive(Debug, Clone)]
pub struct LeaderEntry {
    /// Server kind.
    pub server: ServerKind,
    /// App name from the title.
    pub app: String,
    /// The leader process.
    pub leader: Found,
    /// Workers sorted by slot, then age.
    pub workers: Vec<WorkerEntry>,
}

/// One scan's result.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Leaders sorted by PID.
    pub leaders: Vec<LeaderEntry>,
}

impl Snapshot {
    /// The leader with `pid`.
    pub fn leader(&self, pid: u32) -> Option<&LeaderEntry> {
        self.leaders.iter().find(|l| l.leader.key.pid == pid)
    }

    /// The worker with `pid` and the leader it belongs to.
    pub fn worker(&self, pid: u32) -> Option<(&LeaderEntry, &WorkerEntry)> {
        self.leaders.iter().find_map(|l| {
            l.workers
                .iter()
                .find(|w| w.process.key.pid == pid)
                .map(|w| (l, w))
        })
    }
}

/// Reads processes from a proc file system root (normally `/proc`).
#[derive(Debug, Clone)]
pub struct ProcSource {
    root: PathBuf,
    ticks_per_second: u64,
    boot_time: Option<u64>,
}

impl ProcSource {
    /// A source reading `root` (`/proc` in production, a fixture tree in tests).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        let boot_time = read_boot_time(&root);
        Self {
            root,
            ticks_per_second: procfs::ticks_per_second().max(1),
            boot_time,
        }
    }

    /// The root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Start time in seconds since the Unix epoch (0 when the boot time is unknown).
    pub fn started_at(&self, start_ticks: u64) -> f64 {
        match self.boot_time {
            Some(boot) => boot as f64 + start_ticks as f64 / self.ticks_per_second as f64,
            None => 0.0,
        }
    }

    /// CPU ticks in seconds.
    pub fn cpu_seconds(&self, ticks: u64) -> f64 {
        ticks as f64 / self.ticks_per_second as f64
    }

    /// Reads one process; `None` when it is gone, a zombie, or unreadable.
    fn read(&self, dir: PathBuf) -> Option<(Process, Found)> {
        let process = Process::new_with_root(dir).ok()?;
        let stat = process.stat().ok()?;
        if matches!(stat.state, 'Z' | 'X') {
            return None;
        }
        let argv = process.cmdline().ok()?;
        let class = classify(&argv);
        let found = Found {
            key: ProcessKey {
                pid: u32::try_from(stat.pid).ok()?,
                start_ticks: stat.starttime,
            },
            ppid: u32::try_from(stat.ppid).unwrap_or(0),
            title: argv.join(" ").trim().to_owned(),
            class,
            cpu_ticks: stat.utime.saturating_add(stat.stime),
        };
        Some((process, found))
    }

    /// Re-reads the process `key` names; `None` when it exited or its PID now belongs to
    /// another process.
    pub fn lookup(&self, key: ProcessKey) -> Option<Found> {
        let (_, found) = self.read(self.root.join(key.pid.to_string()))?;
        (found.key == key).then_some(found)
    }

    /// Memory of `key`, read through the same open `/proc/PID` folder whose start time was
    /// checked, so a reused PID cannot slip in between. `None` when it exited or is unreadable.
    pub fn memory(&self, key: ProcessKey) -> Option<Memory> {
        let process = Process::new_with_root(self.root.join(key.pid.to_string())).ok()?;
        let stat = process.stat().ok()?;
        if stat.starttime != key.start_ticks {
            return None;
        }
        memory::read(&process)
    }

    /// Every leader and worker now running. Vanished and unreadable processes are skipped.
    pub fn scan(&self) -> Snapshot {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Snapshot::default();
        };
        let mut all: HashMap<u32, Found> = HashMap::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if let Some((_, found)) = self.read(self.root.join(pid.to_string()))
                && found.class != Title::Other
            {
                all.insert(pid, found);
            }
        }
        build(all)
    }

    /// [`scan`](Self::scan) plus memory of every process, as the API lists them.
    pub fn list(&self) -> ProcessList {
        let snap = self.scan();
        self.view(&snap)
    }

    /// Renders a snapshot with memory read now.
    pub fn view(&self, snap: &Snapshot) -> ProcessList {
        let view = |f: &Found, slot: Option<u32>| ProcessView {
            pid: f.key.pid,
            start_ticks: f.key.start_ticks,
            started_at: self.started_at(f.key.start_ticks),
            slot,
            title: f.title.clone(),
            cpu_seconds: self.cpu_seconds(f.cpu_ticks),
            memory: self.memory(f.key),
        };
        ProcessList {
            leaders: snap
                .leaders
                .iter()
                .map(|l| LeaderView {
                    server: l.server,
                    app: l.app.clone(),
                    leader: view(&l.leader, None),
                    workers: l
                        .workers
                        .iter()
                        .map(|w| view(&w.process, Some(w.slot)))
                        .collect(),
                })
                .collect(),
        }
    }
}

/// `btime` from `{root}/stat`.
fn read_boot_time(root: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(root.join("stat")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// Builds leader trees from the classified processes.
fn build(all: HashMap<u32, Found>) -> Snapshot {
    let mut leaders: Vec<LeaderEntry> = Vec::new();
    for found in all.values() {
        let parent = all.get(&found.ppid).map(|p| &p.class);
        let (server, app) = match &found.class {
            Title::ForkscopeLeader { app } => (ServerKind::Forkscope, app.clone()),
            Title::GunicornMaster { app } => (ServerKind::Gunicorn, app.clone()),
            // A gunicorn Python process whose parent is not one is a leader.
            Title::GunicornPython { app }
                if !matches!(
                    parent,
                    Some(Title::GunicornPython { .. } | Title::GunicornMaster { .. })
                ) =>
            {
                (ServerKind::Gunicorn, app.clone())
            }
            _ => continue,
        };
        leaders.push(LeaderEntry {
            server,
            app,
            leader: found.clone(),
            workers: Vec::new(),
        });
    }
    for leader in &mut leaders {
        let pid = leader.leader.key.pid;
        let mut workers: Vec<WorkerEntry> = Vec::new();
        let mut gunicorn: Vec<Found> = Vec::new();
        for found in all.values().filter(|f| f.ppid == pid) {
            match (&found.class, leader.server) {
                (Title::ForkscopeWorker { slot, .. }, ServerKind::Forkscope) => {
                    workers.push(WorkerEntry {
                        process: found.clone(),
                        slot: *slot,
                    })
                }
                (
                    Title::GunicornWorker { .. } | Title::GunicornPython { .. },
                    ServerKind::Gunicorn,
                ) => gunicorn.push(found.clone()),
                _ => {}
            }
        }
        gunicorn.sort_by_key(|f| (f.key.start_ticks, f.key.pid));
        workers.extend(
            gunicorn
                .into_iter()
                .enumerate()
                .map(|(age, process)| WorkerEntry {
                    process,
                    slot: u32::try_from(age).unwrap_or(u32::MAX),
                }),
        );
        workers.sort_by_key(|w| (w.slot, w.process.key.start_ticks));
        leader.workers = workers;
    }
    leaders.sort_by_key(|l| l.leader.key.pid);
    Snapshot { leaders }
}

#[cfg(test)]
pub(crate) mod fixture;
#[cfg(test)]
mod tests;
