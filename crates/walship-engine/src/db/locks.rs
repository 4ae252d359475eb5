//! POSIX record locks on the `-shm` file: who holds a byte, and taking or releasing one
//! without waiting.

use std::fs::File;

/// The process holding a lock that conflicts with an exclusive lock on `byte` of `f`, if
/// any (`fcntl(F_GETLK)`; the caller's own locks never conflict).
#[allow(unsafe_code)]
pub(super) fn lock_holder(f: &File, byte: i64) -> std::io::Result<Option<i32>> {
    use std::os::fd::AsRawFd;
    // SAFETY: `flock` is a plain C struct for which all zeroes is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    // SAFETY: F_GETLK reads and fills in the `flock` we own, on a descriptor kept open by
    // `f` for the whole call.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETLK, &mut fl) };
    if r == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((fl.l_type != libc::F_UNLCK as libc::c_short).then_some(fl.l_pid))
}

/// Takes (`lock`) or releases this process's exclusive POSIX lock on `byte` of `f`, without
/// waiting. `Ok(false)`: another process holds it.
#[allow(unsafe_code)]
pub(super) fn set_lock(f: &File, byte: i64, lock: bool) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: `flock` is a plain C struct for which all zeroes is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = if lock { libc::F_WRLCK } else { libc::F_UNLCK } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    // SAFETY: F_SETLK reads the `flock` we own, on a descriptor kept open by `f`.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &fl) };
    if r == -1 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN | libc::EACCES) => Ok(false),
            _ => Err(e),
        };
    }
    Ok(true)
}
