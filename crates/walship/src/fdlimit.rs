//! The process's limit of open files (`RLIMIT_NOFILE`).
//!
//! `walship replicate` raises its soft limit to the hard one at start, so that replication
//! has every descriptor the system allows it; the HTTP server's connection cap is then set
//! from what is left (`http::server::connection_cap`).

/// The soft and hard limits of open files, `None` when they cannot be read.
fn get() -> Option<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass; nothing else is touched.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
    #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 everywhere
    (rc == 0).then_some((r.rlim_cur as u64, r.rlim_max as u64))
}

/// The soft limit of open files now.
pub fn soft() -> Option<u64> {
    get().map(|(soft, _)| soft)
}

/// Raises the soft limit of open files to the hard limit, and logs what was set.
pub fn raise() {
    let Some((soft, hard)) = get() else {
        tracing::warn!("cannot read the limit of open files");
        return;
    };
    if soft >= hard {
        tracing::info!(
            open_files_limit = soft,
            "limit of open files (already the hard limit)"
        );
        return;
    }
    let r = libc::rlimit {
        rlim_cur: hard as libc::rlim_t,
        rlim_max: hard as libc::rlim_t,
    };
    // SAFETY: setrlimit reads the struct we pass; it changes only this process's limit.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) };
    if rc == 0 {
        tracing::info!(
            open_files_limit = hard,
            was = soft,
            "raised the limit of open files to the hard limit"
        );
    } else {
        let e = std::io::Error::last_os_error();
        tracing::warn!(open_files_limit = soft, hard, error = %e, "cannot raise the limit of open files");
    }
}
