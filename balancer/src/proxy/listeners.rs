//! The proxy's listening sockets while the balancer stops: no connection is
//! completed any more, and those the kernel has already completed (its
//! backlog) are still accepted and served.
//!
//! A client whose `connect()` returned sits in the backlog and has chosen
//! this instance; closing a listening socket resets every such connection,
//! so the drain cannot simply close it. Instead it attaches a socket filter
//! that drops every packet sent to the listening socket: a new client's SYN
//! goes unanswered (it retries, and is refused once the process has exited),
//! while the connections already in the backlog are untouched. Pingora's
//! accept loops go on taking them until the backlog is empty, and only then
//! does the drain let Pingora close the sockets.
//!
//! Pingora 0.9 does not hand its listening sockets out, so they are found
//! among the process's descriptors by their address; outside Linux nothing
//! is found, and the listeners close when Pingora stops, as they did before.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};

/// Copies of the proxy's listening sockets, found when the drain starts.
#[derive(Debug, Default)]
pub struct Listeners(Vec<OwnedFd>);

impl Listeners {
    /// The listening sockets bound to any of `addrs`.
    pub fn find(addrs: &[SocketAddr]) -> Listeners {
        let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
            return Listeners::default();
        };
        let fds = entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter_map(|fd| listening_copy(fd, addrs));
        Listeners(fds.collect())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// From now on the kernel completes no new connection on these sockets.
    pub fn stop_completing(&self) -> std::io::Result<()> {
        self.0.iter().try_for_each(drop_every_packet)
    }

    /// Whether no completed connection waits to be accepted on any of them.
    pub fn backlog_empty(&self) -> bool {
        let mut polled: Vec<libc::pollfd> = self
            .0
            .iter()
            .map(|fd| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `polled` is a live array of `polled.len()` pollfd structs,
        // and a zero timeout returns at once.
        let ready = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, 0) };
        ready == 0
    }
}

/// A copy of `fd` when it is a listening TCP socket bound to one of `addrs`.
/// The copy keeps it a socket of ours while it is looked at, whatever
/// Pingora does with the number meanwhile.
fn listening_copy(fd: i32, addrs: &[SocketAddr]) -> Option<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC only reads the descriptor table; on a number
    // that is not open it fails with EBADF, and the new descriptor is ours.
    let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if copy < 0 {
        return None;
    }
    // SAFETY: `copy` was just opened by us and is owned by nothing else.
    let copy = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(copy) };
    if !is_listening(&copy) {
        return None;
    }
    let listener = std::net::TcpListener::from(copy);
    let bound = listener.local_addr().ok()?;
    addrs.contains(&bound).then(|| OwnedFd::from(listener))
}

fn is_listening(fd: &OwnedFd) -> bool {
    let mut accepting: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the option is an int, written into `accepting` of size `len`.
    let got = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut accepting as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    got == 0 && accepting == 1
}

/// A classic BPF program of one instruction, "keep 0 bytes": the kernel
/// drops each packet to the socket before TCP looks at it (a SYN, or the
/// last ACK of a handshake not yet complete).
fn drop_every_packet(fd: &OwnedFd) -> std::io::Result<()> {
    let mut program = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let filter = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: the kernel copies the program during the call; both live until it returns.
    let set = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&filter as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if set == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    #[test]
    fn a_stopped_listener_completes_no_new_connection_but_keeps_its_backlog() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let found = Listeners::find(&[addr]);
        assert_eq!(found.0.len(), 1, "the listening socket is found by address");
        assert!(found.backlog_empty());
        let waiting = TcpStream::connect(addr).unwrap();
        assert!(!found.backlog_empty(), "a completed connection waits");
        found.stop_completing().unwrap();
        let late = TcpStream::connect_timeout(&addr, Duration::from_millis(300));
        assert!(late.is_err(), "no connection is completed after the stop");
        let (accepted, _) = listener.accept().unwrap();
        assert_eq!(accepted.peer_addr().unwrap(), waiting.local_addr().unwrap());
        assert!(found.backlog_empty(), "the backlog was taken");
    }
}
