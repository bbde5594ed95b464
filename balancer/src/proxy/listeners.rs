//! The proxy's listening sockets while the balancer stops: no connection is
//! completed any more, and those the kernel has already completed (its
//! backlog) are still accepted and served.
//!
//! A client whose `connect()` returned sits in the backlog and has chosen
//! this instance; closing a listening socket resets every such connection,
//! so the drain cannot simply close it. Instead it attaches a socket filter
//! that drops every SYN sent to the listening socket: a new client's SYN
//! goes unanswered (it retries, and is refused once the process has exited),
//! while the connections already in the backlog are untouched, and a
//! handshake already under way (its SYN answered) still completes and joins
//! the backlog; dropping its last ACK too would leave the client with a
//! connection the kernel resets once the socket is closed. Pingora's accept
//! loops go on taking the backlog until it is empty, and only then does the
//! drain let Pingora close the sockets.
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
        self.0.iter().try_for_each(drop_new_handshakes)
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

/// A classic BPF program that keeps 0 bytes of a SYN (the SYN bit set, the
/// ACK bit not) and all of any other packet: the kernel drops each new
/// client's SYN before TCP looks at it. A socket filter of a TCP socket
/// reads the packet from its TCP header, whose byte 13 holds the flags.
fn drop_new_handshakes(fd: &OwnedFd) -> std::io::Result<()> {
    const TCP_FLAGS: u32 = 13;
    const SYN: u32 = 0x02;
    const ACK: u32 = 0x10;
    let mut program = [
        op(libc::BPF_LD | libc::BPF_B | libc::BPF_ABS, 0, 0, TCP_FLAGS),
        op(libc::BPF_ALU | libc::BPF_AND | libc::BPF_K, 0, 0, SYN | ACK),
        // A SYN goes on to the next instruction, anything else skips it.
        op(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, 0, 1, SYN),
        op(libc::BPF_RET | libc::BPF_K, 0, 0, 0),
        op(libc::BPF_RET | libc::BPF_K, 0, 0, u32::MAX),
    ];
    attach_filter(fd, &mut program)
}

/// One instruction of a classic BPF program.
fn op(code: u32, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

/// Attaches the classic BPF `program` to the socket `fd` (the kernel keeps
/// a copy).
fn attach_filter(fd: &impl AsRawFd, program: &mut [libc::sock_filter]) -> std::io::Result<()> {
    let filter = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    set_option(fd, libc::SO_ATTACH_FILTER, &filter)
}

/// `setsockopt(fd, SOL_SOCKET, option, value)`.
fn set_option<T>(fd: &impl AsRawFd, option: libc::c_int, value: &T) -> std::io::Result<()> {
    // SAFETY: the kernel reads `size_of::<T>()` bytes of `value` during the
    // call (and copies a program it points to); all live until it returns.
    let set = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
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

    /// `Listeners::find` copies, for a moment, every listening socket of the
    /// process, those of a test beside it too: the tests that find take
    /// turns.
    static FINDING: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn a_stopped_listener_completes_no_new_connection_but_keeps_its_backlog() {
        let _turn = FINDING.lock().unwrap_or_else(|e| e.into_inner());
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

    /// A client socket, non-blocking, that drops whatever it receives until
    /// [`unblock`] (a socket filter of its own), connecting to `addr`.
    fn half_open_client(addr: std::net::SocketAddr) -> OwnedFd {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket calls on a descriptor this function opens and
        // owns; every pointer handed over lives until the call returns.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0);
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let fd = OwnedFd::from_raw_fd(fd);
            let mut drop_all = [op(libc::BPF_RET | libc::BPF_K, 0, 0, 0)];
            attach_filter(&fd, &mut drop_all).expect("SO_ATTACH_FILTER");
            let std::net::SocketAddr::V4(v4) = addr else {
                panic!("an IPv4 address");
            };
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*v4.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            let started = libc::connect(
                fd.as_raw_fd(),
                (&sin as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            assert!(
                started == 0
                    || std::io::Error::last_os_error().raw_os_error() == Some(libc::EINPROGRESS)
            );
            fd
        }
    }

    /// Whether a handshake to local `port` is half done: its SYN answered
    /// (`SYN_RECV`, state 03 in /proc/net/tcp), its last ACK not yet in.
    fn answered_handshakes(port: u16) -> bool {
        let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
        let local = format!(":{port:04X}");
        table.lines().skip(1).any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 3 && fields[1].ends_with(&local) && fields[3] == "03"
        })
    }

    fn unblock(fd: &OwnedFd) {
        set_option(fd, libc::SO_DETACH_FILTER, &0).expect("SO_DETACH_FILTER");
    }

    #[test]
    fn a_handshake_under_way_when_the_listener_stops_still_completes() {
        let _turn = FINDING.lock().unwrap_or_else(|e| e.into_inner());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let found = Listeners::find(&[addr]);
        // The client's SYN reaches the listener and is answered, but the
        // client drops the answer: the handshake waits, half done.
        let client = half_open_client(addr);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !answered_handshakes(addr.port()) {
            assert!(
                std::time::Instant::now() < deadline,
                "the listener never answered the client's SYN"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(found.backlog_empty(), "the handshake is not complete yet");
        found.stop_completing().unwrap();
        unblock(&client);
        // The listener sends its answer again (after about a second); the
        // client's last ACK gets through the filter and completes it.
        let deadline = std::time::Instant::now() + Duration::from_secs(8);
        let accepted = loop {
            match listener.accept() {
                Ok((accepted, _)) => break accepted,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the handshake under way never completed"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        accepted.set_nonblocking(false).unwrap();
        let mut client = std::net::TcpStream::from(client);
        client.set_nonblocking(false).unwrap();
        use std::io::{Read, Write};
        client.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        let mut accepted = accepted;
        accepted.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping", "the connection carries bytes");
        // And a new client is still not answered.
        let late = TcpStream::connect_timeout(&addr, Duration::from_millis(300));
        assert!(
            late.is_err(),
            "no new connection is completed after the stop"
        );
    }
}
