//! `replicate --exec`: the application, run by `/bin/sh -c` in a process group of its own,
//! and the signals walship passes on to it.
//!
//! Signals go to the whole group (`kill(-pgid, …)`), so they reach the application however
//! the command is written: a shell that runs it as a child (dash does, even for a single
//! command), a pipeline, a script that starts workers. The shell traps the forwarded signals
//! with `exit`: it does not die at the first signal but waits for its foreground command, then
//! exits with that command's status (a trap's `exit` takes the status of the command before
//! the trap) and runs nothing after it, so a restart loop ends too. The application's own
//! dispositions are untouched: traps are reset to the default in a child at exec.
//! [`App::stop`] waits until no process of the group is left, killing the group at a
//! deadline: walship's final sync starts only after that, so nothing the application commits
//! is left out of it.
//!
//! The group is not the terminal's foreground group: Ctrl-C on a terminal reaches walship,
//! which forwards SIGINT to the group.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::signal::unix::{Signal, SignalKind, signal};

/// Set before the command: at a forwarded signal the shell lets its foreground command finish,
/// then exits with its status, rather than dying at once with 128+N while the command still
/// runs (a signal between two commands exits with the status of the one before). A `trap` in
/// the command replaces it.
const SHELL_PRELUDE: &str = "trap exit INT TERM HUP; ";

/// How often [`App::stop`] looks whether a process of the group is left.
const POLL: Duration = Duration::from_millis(50);

/// How long to wait for the group to vanish after SIGKILL (a process in uninterruptible
/// I/O dies only when the I/O returns).
const KILL_GRACE: Duration = Duration::from_secs(10);

/// The signals `replicate` handles: SIGTERM and SIGINT stop it; SIGHUP stops it too when
/// there is no `--exec` command, and is only passed on when there is one.
#[derive(Debug)]
pub struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    pub fn install() -> Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("install SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("install SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("install SIGHUP handler")?,
        })
    }

    /// The next signal received (its number). Cancel-safe.
    pub async fn recv(&mut self) -> i32 {
        tokio::select! {
            Some(()) = self.term.recv() => libc::SIGTERM,
            Some(()) = self.int.recv() => libc::SIGINT,
            Some(()) = self.hup.recv() => libc::SIGHUP,
            else => std::future::pending().await,
        }
    }
}

/// The running `--exec` command.
#[derive(Debug)]
pub struct App {
    shell: tokio::process::Child,
    /// The group's id: the shell's PID.
    pgid: i32,
    /// The shell's status, once reaped.
    status: Option<ExitStatus>,
}

impl App {
    /// Starts `/bin/sh -c CMD` as the leader of a new process group.
    pub fn spawn(cmd: &str) -> Result<App> {
        let shell = tokio::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("{SHELL_PRELUDE}{cmd}"))
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .with_context(|| format!("cannot start --exec command `{cmd}`"))?;
        let pid = shell
            .id()
            .with_context(|| format!("--exec command `{cmd}` exited at once"))?;
        let pgid = i32::try_from(pid).context("--exec command: PID out of range")?;
        tracing::info!(pid, pgid, "started the --exec command");
        Ok(App {
            shell,
            pgid,
            status: None,
        })
    }

    /// Sends `sig` to every process of the group, then SIGCONT, so a process stopped (by
    /// SIGTTIN from a terminal read, say) acts on it.
    pub fn signal(&self, sig: i32) {
        tracing::info!(
            signal = sig,
            pgid = self.pgid,
            "signalling the --exec command"
        );
        kill_group(self.pgid, sig);
        if sig != libc::SIGKILL && sig != libc::SIGCONT {
            kill_group(self.pgid, libc::SIGCONT);
        }
    }

    /// The shell's exit: the command ended by itself (or was signalled). Cancel-safe.
    pub async fn wait_shell(&mut self) -> Result<ExitStatus> {
        if let Some(st) = self.status {
            return Ok(st);
        }
        let st = self
            .shell
            .wait()
            .await
            .context("wait for the --exec command")?;
        self.status = Some(st);
        Ok(st)
    }

    /// Waits until the shell has exited and no process of its group is left; returns the
    /// shell's status. Cancel-safe.
    async fn gone(&mut self) -> Result<ExitStatus> {
        let st = self.wait_shell().await?;
        while self.group_alive() {
            tokio::time::sleep(POLL).await;
        }
        Ok(st)
    }

    /// Whether a process of the group is left that can still run; exited ones waiting to be
    /// reaped by their new parent (zombies) do not count. Call only once the shell is reaped:
    /// this reaps the group's processes that were re-parented to walship (when it runs as
    /// PID 1), and must not take the shell's status from under tokio.
    fn group_alive(&self) -> bool {
        reap_group(self.pgid);
        // SAFETY: kill(2) with signal 0 only checks; a negative PID names the group.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::kill(-self.pgid, 0) };
        if rc != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EPERM) {
            return false;
        }
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return true;
        };
        procs
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .any(|pid| matches!(proc_state(pid), Some((state, g)) if g == self.pgid && !matches!(state, 'Z' | 'X')))
    }

    /// Stops the command: sends `sig` to its group, passes on every further signal, and
    /// SIGKILLs the group if a process of it is left after `deadline`. Returns once the group
    /// is gone, with the shell's status.
    pub async fn stop(
        &mut self,
        sig: i32,
        deadline: Duration,
        signals: &mut Signals,
    ) -> Result<ExitStatus> {
        self.signal(sig);
        let kill_at = tokio::time::sleep(deadline);
        tokio::pin!(kill_at);
        loop {
            tokio::select! {
                st = self.gone() => return st,
                sig = signals.recv() => self.signal(sig),
                () = &mut kill_at => break,
            }
        }
        tracing::warn!(
            pgid = self.pgid,
            "the --exec command did not exit within {deadline:?} (--shutdown-timeout); killing its process group"
        );
        self.signal(libc::SIGKILL);
        match tokio::time::timeout(KILL_GRACE, self.gone()).await {
            Ok(st) => st,
            Err(_) => {
                tracing::warn!(
                    pgid = self.pgid,
                    "a process of the --exec command's group survives SIGKILL; making the final sync anyway"
                );
                Ok(self
                    .status
                    .unwrap_or_else(|| ExitStatus::from_raw(libc::SIGKILL)))
            }
        }
    }

    /// Whether the shell has exited and no process of its group is left.
    pub fn is_gone(&mut self) -> bool {
        if self.status.is_none() {
            match self.shell.try_wait() {
                Ok(Some(st)) => self.status = Some(st),
                _ => return false,
            }
        }
        !self.group_alive()
    }
}

/// A process's state letter and process group, from `/proc/PID/stat`.
fn proc_state(pid: u32) -> Option<(char, i32)> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The state letter and process group of a `/proc/PID/stat` line.
fn parse_stat(stat: &str) -> Option<(char, i32)> {
    // The command name, in parentheses, may hold spaces and parentheses: fields follow the
    // last `)`: state, ppid, pgrp, ...
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let pgrp = fields.nth(1)?.parse().ok()?;
    Some((state, pgrp))
}

fn kill_group(pgid: i32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions; `-pgid` names our child's group.
    #[allow(unsafe_code)]
    let _ = unsafe { libc::kill(-pgid, sig) };
}

/// Reaps exited processes of group `pgid` that are walship's children (orphans re-parented
/// to it when it is PID 1), so they do not linger as zombies that still count as the group.
fn reap_group(pgid: i32) {
    loop {
        // SAFETY: waitid writes only into `info`, a zeroed siginfo_t we own.
        #[allow(unsafe_code)]
        let pid = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let rc = libc::waitid(
                libc::P_PGID,
                pgid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG,
            );
            if rc != 0 { 0 } else { info.si_pid() }
        };
        if pid == 0 {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_stat_reads_state_and_group_after_an_odd_command_name() {
        assert_eq!(
            parse_stat("4242 (python3) S 4241 4241 4241 0 -1 4194560 ..."),
            Some(('S', 4241))
        );
        assert_eq!(parse_stat("77 (a) b (c) Z 1 70 70 0 -1"), Some(('Z', 70)));
        assert_eq!(parse_stat("garbage"), None);
    }

    /// Waits until `sleep` runs in the app's group (the shell is past its trap and the
    /// signal will find the command running).
    async fn sleep_runs(app: &App) {
        let running = || {
            std::fs::read_dir("/proc").unwrap().any(|e| {
                let Ok(stat) = std::fs::read_to_string(e.unwrap().path().join("stat")) else {
                    return false;
                };
                stat.contains("(sleep)") && parse_stat(&stat).is_some_and(|(_, g)| g == app.pgid)
            })
        };
        while !running() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn stop_waits_for_the_command_and_returns_its_status() {
        let mut signals = Signals::install().unwrap();
        // The shell runs `sleep` as a child; the signal reaches it through the group.
        let mut app = App::spawn("sleep 30; echo not reached").unwrap();
        sleep_runs(&app).await;
        let st = app
            .stop(libc::SIGTERM, Duration::from_secs(30), &mut signals)
            .await
            .unwrap();
        assert_eq!(st.code(), Some(128 + libc::SIGTERM), "{st}");
        assert!(app.is_gone());
    }

    #[tokio::test]
    async fn stop_kills_the_group_at_the_deadline() {
        let mut signals = Signals::install().unwrap();
        // SIGTERM ignored by the shell and, inherited, by `sleep`.
        let mut app = App::spawn("trap '' TERM; sleep 30").unwrap();
        sleep_runs(&app).await;
        let st = app
            .stop(libc::SIGTERM, Duration::from_millis(300), &mut signals)
            .await
            .unwrap();
        assert_eq!(st.signal(), Some(libc::SIGKILL), "{st}");
        assert!(app.is_gone());
    }
}
