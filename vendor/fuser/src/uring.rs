//! FUSE over io_uring (Linux 6.14 and later, with the `fuse` module's
//! `enable_uring` parameter set).
//!
//! The kernel keeps one request queue per possible CPU and puts a request on
//! the queue of the CPU its caller runs on. Each queue here is served by a
//! thread pinned to that CPU, so a request and its reply are each a wakeup
//! on the same CPU instead of a wakeup across CPUs: on virtual machines,
//! where a cross-CPU wakeup costs tens of microseconds, that is most of what
//! a metadata request costs.
//!
//! A queue thread owns an io_uring and `depth` ring entries. Each entry is a
//! header buffer (`fuse_uring_req_header`) and a payload buffer registered
//! with the kernel (`FUSE_IO_URING_CMD_REGISTER`). When a request arrives its
//! completion names the entry; the thread rebuilds the request as one
//! contiguous buffer (the layout `/dev/fuse` delivers, so the same parser
//! and dispatch serve both), dispatches it, and hands the entry back with the
//! reply (`FUSE_IO_URING_CMD_COMMIT_AND_FETCH`), which also fetches the next
//! request for it.
//!
//! Ownership of an entry's buffers passes between the kernel (from register
//! or commit until its completion) and the queue thread (from completion
//! until commit); they are never touched by both. A reply does not write
//! them: it is staged in the entry's [`Slot`] and copied in by the queue
//! thread after dispatch has returned, so no reply can overwrite request
//! bytes a filesystem method still borrows. Replies sent later from another
//! thread wake the queue thread through its eventfd.
//!
//! A queue thread runs at `SCHED_IDLE` so that the callers it answers stay
//! on its CPU (`keep_callers_in_place`).
//!
//! A queue thread serves its CPU alone, so a request whose time has no
//! bound (an fsync, a copy or an allocation) is handed to a small pool of
//! worker threads with a copy of its bytes, and the queue goes on; the
//! worker's reply wakes the queue thread to commit it. Reads and writes
//! stay on the queue: they are bounded by `max_write`, and handing a
//! 1 MiB write across CPUs cost in-place overwrites 15% of their speed.
//!
//! FORGET, BATCH_FORGET and INTERRUPT still arrive through `read()` on
//! `/dev/fuse`, as do requests made before every queue is registered, so
//! the session's `/dev/fuse` threads keep running beside the queues.

use std::cell::UnsafeCell;
use std::io;
use std::io::IoSlice;
use std::mem::size_of;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::os::fd::FromRawFd;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::thread::ThreadId;

use io_uring::IoUring;
use io_uring::cqueue;
use io_uring::opcode;
use io_uring::squeue;
use io_uring::types;
use log::error;
use log::warn;
use parking_lot::Mutex;
use zerocopy::IntoBytes;

use crate::Filesystem;
use crate::fusectl;
use crate::ll::Operation;
use crate::reply::ReplyEmpty;
use crate::request::RequestWithSender;
use crate::session::SessionEventLoop;

const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;

/// `struct fuse_uring_ent_in_out`.
#[repr(C)]
struct EntInOut {
    flags: u64,
    /// The id to commit the request with (its `unique`).
    commit_id: u64,
    /// Bytes of the payload buffer in use, in both directions.
    payload_sz: u32,
    padding: u32,
    reserved: u64,
}

/// `struct fuse_uring_req_header`.
#[repr(C)]
struct ReqHeader {
    /// `fuse_in_header` of a request, `fuse_out_header` of its reply.
    in_out: [u8; 128],
    /// The request's first argument, its per-operation header.
    op_in: [u8; 128],
    ent: EntInOut,
}

/// `struct fuse_uring_cmd_req`, at the start of the SQE's command area.
fn cmd_req(commit_id: u64, qid: u16) -> [u8; 80] {
    let mut cmd = [0u8; 80];
    cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    cmd[16..18].copy_from_slice(&qid.to_ne_bytes());
    cmd
}

const IN_HEADER: usize = 40;
const OUT_HEADER: usize = 16;
/// Room in front of the payload for a request's `fuse_in_header` and
/// per-operation header, so that the whole request is one slice.
const FRONT: usize = IN_HEADER + 128;

/// Whether this kernel lets this process make the 128-byte-SQE rings the
/// queues need (io_uring may be disabled by `kernel.io_uring_disabled`).
/// Asked before FUSE_INIT is answered: once the kernel is told the queues
/// will come, it holds every request until they do.
pub(crate) fn available() -> bool {
    IoUring::<squeue::Entry128, cqueue::Entry>::builder()
        .build(2)
        .is_ok()
}

/// A reply to a request that came through a queue: staged here until the
/// queue thread commits it.
#[derive(Debug, Clone)]
pub(crate) struct RingReply {
    slot: Arc<Slot>,
    entry: usize,
    waker: Arc<Waker>,
}

impl RingReply {
    pub(crate) fn send(&self, data: &[IoSlice<'_>]) -> io::Result<()> {
        {
            let mut staged = self.slot.reply.lock();
            if staged.is_some() {
                return Err(io::Error::other("a FUSE request was answered twice"));
            }
            let mut bytes = std::mem::take(&mut *self.slot.spare.lock());
            bytes.clear();
            for slice in data {
                bytes.extend_from_slice(slice);
            }
            *staged = Some(bytes);
        }
        self.waker.ready.lock().push(self.entry);
        if std::thread::current().id() != self.waker.queue_thread {
            self.waker.wake();
        }
        Ok(())
    }
}

/// One entry's reply, between the filesystem and the queue thread.
#[derive(Debug, Default)]
struct Slot {
    reply: Mutex<Option<Vec<u8>>>,
    /// The previous reply's allocation, reused.
    spare: Mutex<Vec<u8>>,
}

/// What a queue thread is woken for besides the kernel: replies made on
/// other threads, and the end of the session.
#[derive(Debug)]
struct Waker {
    eventfd: OwnedFd,
    ready: Mutex<Vec<usize>>,
    stop: AtomicBool,
    queue_thread: ThreadId,
}

impl Waker {
    /// A waker for the calling thread's queue.
    fn new() -> io::Result<Waker> {
        // SAFETY: plain syscall; the descriptor is owned from here on.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Waker {
            eventfd: unsafe { OwnedFd::from_raw_fd(fd) },
            ready: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            queue_thread: std::thread::current().id(),
        })
    }

    fn wake(&self) {
        let one = 1u64.to_ne_bytes();
        if let Err(err) = nix::unistd::write(&self.eventfd, &one) {
            error!("waking a FUSE queue thread: {err}");
        }
    }
}

/// The memory of one ring entry, registered with the kernel.
struct Entry {
    header: Box<UnsafeCell<ReqHeader>>,
    /// `FRONT` bytes, then the payload buffer; 8-aligned, as the request
    /// parser wants its buffer.
    data: Box<UnsafeCell<[u64]>>,
    iov: Box<[libc::iovec; 2]>,
    slot: Arc<Slot>,
    commit_id: u64,
}

impl Entry {
    fn new(payload: usize) -> Self {
        let words = (FRONT + payload).div_ceil(8);
        let header = Box::new(UnsafeCell::new(ReqHeader {
            in_out: [0; 128],
            op_in: [0; 128],
            ent: EntInOut {
                flags: 0,
                commit_id: 0,
                payload_sz: 0,
                padding: 0,
                reserved: 0,
            },
        }));
        let data: Box<UnsafeCell<[u64]>> = unsafe {
            // SAFETY: UnsafeCell<[u64]> has the layout of [u64].
            std::mem::transmute::<Box<[u64]>, Box<UnsafeCell<[u64]>>>(
                vec![0u64; words].into_boxed_slice(),
            )
        };
        let payload_ptr = unsafe { (data.get() as *mut u8).add(FRONT) };
        let iov = Box::new([
            libc::iovec {
                iov_base: header.get().cast(),
                iov_len: size_of::<ReqHeader>(),
            },
            libc::iovec {
                iov_base: payload_ptr.cast(),
                iov_len: payload,
            },
        ]);
        Entry {
            header,
            data,
            iov,
            slot: Arc::default(),
            commit_id: 0,
        }
    }

    fn bytes(&mut self) -> &mut [u8] {
        self.data.get_mut().as_mut_bytes()
    }
}

/// The queue threads of a session.
pub(crate) struct Queues {
    wakers: Vec<Arc<Waker>>,
    threads: Vec<JoinHandle<()>>,
    /// Closing it ends the workers.
    offload: Option<std::sync::mpsc::Sender<Offloaded>>,
    workers: Vec<JoinHandle<()>>,
    /// Why a queue stopped serving, when one failed.
    failure: Arc<Mutex<Option<io::Error>>>,
}

/// A request handed from a queue to a worker: its bytes (8-aligned, as
/// the parser wants them) and where its reply goes.
struct Offloaded {
    words: Vec<u64>,
    len: usize,
    reply: RingReply,
}

/// Worker threads for requests that may take long.
const WORKERS: usize = 4;

/// Whether a request may take long enough to hold up its queue: those
/// whose time is bounded by no size the kernel was told of.
fn may_take_long(opcode: u32) -> bool {
    use crate::ll::fuse_abi::fuse_opcode as op;
    [
        op::FUSE_FSYNC,
        op::FUSE_FSYNCDIR,
        op::FUSE_FALLOCATE,
        op::FUSE_COPY_FILE_RANGE,
    ]
    .into_iter()
    .any(|slow| slow as u32 == opcode)
}

impl Queues {
    /// Starts one queue per possible CPU, each with `depth` entries whose
    /// payload buffers hold `payload` bytes (at least the largest request or
    /// reply the kernel was told of at FUSE_INIT).
    /// A queue that fails ends the connection mounted at `mountpoint`
    /// (fusectl's abort), and `stop` returns its error.
    pub(crate) fn start<FS: Filesystem>(
        loops: impl Fn(String) -> SessionEventLoop<FS>,
        depth: usize,
        payload: usize,
        mountpoint: Option<PathBuf>,
    ) -> io::Result<Queues> {
        let cpus = possible_cpus()?;
        let (offload, offloaded) = std::sync::mpsc::channel::<Offloaded>();
        let offloaded = Arc::new(Mutex::new(offloaded));
        let mut queues = Queues {
            wakers: Vec::new(),
            threads: Vec::new(),
            offload: Some(offload.clone()),
            workers: Vec::new(),
            failure: Arc::default(),
        };
        for n in 0..WORKERS {
            let name = format!("fuser-worker-{n}");
            let event_loop = loops(name.clone());
            let offloaded = offloaded.clone();
            queues
                .workers
                .push(std::thread::Builder::new().name(name).spawn(move || {
                    loop {
                        let next = offloaded.lock().recv();
                        let Ok(Offloaded { words, len, reply }) = next else {
                            return;
                        };
                        run(&event_loop, &words.as_bytes()[..len], reply);
                    }
                })?);
        }
        for qid in 0..cpus {
            let name = format!("fuser-ring-{qid}");
            let event_loop = loops(name.clone());
            let fd = event_loop.ch.as_fd().as_raw_fd();
            let offload = offload.clone();
            let mountpoint = mountpoint.clone();
            let failure = queues.failure.clone();
            let (tx, rx) = std::sync::mpsc::channel();
            // The thread reports once its entries are handed to the kernel:
            // a queue that never registers would hold every request forever,
            // so failing to make one fails the session.
            let thread = std::thread::Builder::new().name(name).spawn(move || {
                pin_to_cpu(qid);
                keep_callers_in_place();
                let opened = Waker::new().and_then(|waker| {
                    let queue = Queue {
                        fuse_fd: fd,
                        qid: qid as u16,
                        waker: Arc::new(waker),
                        offload,
                    };
                    let (ring, entries) = queue.open(depth, payload)?;
                    Ok((queue, ring, entries))
                });
                let (queue, ring, entries) = match opened {
                    Ok(opened) => opened,
                    Err(err) => {
                        let _ = tx.send(Err(err));
                        return;
                    }
                };
                let _ = tx.send(Ok(queue.waker.clone()));
                if let Err(err) = queue.serve(&event_loop, ring, entries) {
                    // Nothing else serves this CPU's queue: its callers
                    // would wait forever.
                    error!("FUSE queue {qid} failed ({err}): ending the connection");
                    let aborted = mountpoint
                        .as_deref()
                        .ok_or_else(|| io::Error::other("the session has no mountpoint"))
                        .and_then(fusectl::connection_at)
                        .and_then(fusectl::abort_connection);
                    if let Err(err) = aborted {
                        error!("ending the FUSE connection: {err}");
                    }
                    *failure.lock() =
                        Some(io::Error::other(format!("FUSE queue {qid} failed: {err}")));
                }
            })?;
            queues.threads.push(thread);
            let waker = rx
                .recv()
                .map_err(|_| io::Error::other("FUSE queue thread ended at start"))??;
            queues.wakers.push(waker);
        }
        Ok(queues)
    }

    /// Ends every queue thread and waits for them; the error of a queue
    /// that failed.
    pub(crate) fn stop(mut self) -> io::Result<()> {
        for waker in &self.wakers {
            waker.stop.store(true, Ordering::Release);
            waker.wake();
        }
        drop(self.offload.take());
        for thread in self.threads.into_iter().chain(self.workers) {
            if thread.join().is_err() {
                error!("a FUSE queue thread panicked");
            }
        }
        match self.failure.lock().take() {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }
}

/// `num_possible_cpus()`: the kernel makes one queue per possible CPU and
/// uses none until every one has an entry.
fn possible_cpus() -> io::Result<usize> {
    let list = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let last = list
        .trim()
        .rsplit([',', '-'])
        .next()
        .and_then(|n| n.parse::<usize>().ok())
        .ok_or_else(|| io::Error::other(format!("cannot read possible CPUs from {list:?}")))?;
    Ok(last + 1)
}

fn pin_to_cpu(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    // A CPU that is possible but offline cannot be pinned to; its queue
    // then runs wherever the scheduler puts it.
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// Runs the calling queue thread at `SCHED_IDLE`, so that the callers it
/// answers stay on its CPU.
///
/// The kernel's wakeup of a caller whose reply is committed is not a sync
/// one: the queue thread still runs on the CPU, so the scheduler moves the
/// caller to an idle CPU, whose queue takes its next request, and every
/// reply becomes a wakeup across CPUs again. A CPU whose only runnable
/// threads are at `SCHED_IDLE` counts as idle to that choice, and a woken
/// caller preempts such a thread at once: the caller stays, the queue
/// thread finishes when the caller next blocks, and request and reply are
/// handoffs on one CPU. An untar of 100,000 files through the mount took
/// 8.7 s at this priority against 16-21 s without (native 6.6-7.5 s).
///
/// The risk is a queue thread starved by busy threads on its CPU; under
/// the kernels that have these queues (6.14 and later, whose fair
/// scheduler is EEVDF) it is not: with three busy loops on the caller's
/// CPU, 20,000 lookups had the same p50, p99 and worst case (7 us, 10 us,
/// 13 ms) as at normal priority (docs/BENCHMARKS.md in ferry, session 8).
fn keep_callers_in_place() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain syscall on the calling thread with a valid parameter.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if rc != 0 {
        warn!(
            "FUSE queue thread stays at normal priority: {}",
            io::Error::last_os_error()
        );
    }
}

/// The user_data of the eventfd poll; entries use their index.
const WAKE: u64 = u64::MAX;

type Ring = IoUring<squeue::Entry128, cqueue::Entry>;

/// One CPU's queue, served by the thread that owns it.
struct Queue {
    fuse_fd: i32,
    qid: u16,
    waker: Arc<Waker>,
    offload: std::sync::mpsc::Sender<Offloaded>,
}

impl Queue {
    /// Makes the ring and registers `depth` entries with the kernel.
    fn open(&self, depth: usize, payload: usize) -> io::Result<(Ring, Vec<Entry>)> {
        let mut ring: Ring = IoUring::builder()
            .setup_cqsize(2 * (depth as u32 + 1))
            .build(depth as u32 + 1)?;
        let entries: Vec<Entry> = (0..depth).map(|_| Entry::new(payload)).collect();
        for (index, entry) in entries.iter().enumerate() {
            push(&mut ring, self.register_sqe(entry).user_data(index as u64))?;
        }
        self.arm_wake(&mut ring)?;
        ring.submit()?;
        Ok((ring, entries))
    }

    fn serve<FS: Filesystem>(
        &self,
        event_loop: &SessionEventLoop<FS>,
        mut ring: Ring,
        mut entries: Vec<Entry>,
    ) -> io::Result<()> {
        let depth = entries.len();
        let mut completed = Vec::with_capacity(depth + 1);
        loop {
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(err) if err.raw_os_error() == Some(libc::EINTR) => continue,
                Err(err) => return Err(err),
            }
            completed.clear();
            completed.extend(ring.completion().map(|c| (c.user_data(), c.result())));
            for &(user_data, result) in &completed {
                if user_data == WAKE {
                    let mut count = [0u8; 8];
                    let _ = nix::unistd::read(&self.waker.eventfd, &mut count);
                    if self.waker.stop.load(Ordering::Acquire) {
                        return Ok(());
                    }
                    self.arm_wake(&mut ring)?;
                    continue;
                }
                let index = user_data as usize;
                match -result {
                    0 => self.dispatch(event_loop, &mut entries[index], index),
                    // The command did not take; make it again.
                    libc::EINTR | libc::EAGAIN => {
                        let entry = &entries[index];
                        let sqe = if entry.commit_id == 0 {
                            self.register_sqe(entry)
                        } else {
                            self.commit_sqe(entry.commit_id)
                        };
                        push(&mut ring, sqe.user_data(user_data))?;
                    }
                    // The connection ended (unmount or abort).
                    libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED | libc::ENODEV => {
                        return Ok(());
                    }
                    // A refused registration turns the kernel's queues off:
                    // requests go on through /dev/fuse.
                    errno if entries[index].commit_id == 0 => {
                        let err = io::Error::from_raw_os_error(errno);
                        warn!(
                            "the kernel refused a FUSE io_uring queue ({err}): requests go through /dev/fuse"
                        );
                        return Ok(());
                    }
                    errno => return Err(io::Error::from_raw_os_error(errno)),
                }
            }
            let ready: Vec<usize> = std::mem::take(&mut *self.waker.ready.lock());
            for index in ready {
                let entry = &mut entries[index];
                commit(entry);
                push(
                    &mut ring,
                    self.commit_sqe(entry.commit_id).user_data(index as u64),
                )?;
            }
        }
    }

    /// Rebuilds the request in `entry` as one buffer and dispatches it, here
    /// or on a worker.
    fn dispatch<FS: Filesystem>(
        &self,
        event_loop: &SessionEventLoop<FS>,
        entry: &mut Entry,
        index: usize,
    ) {
        // SAFETY: the kernel is done with the entry until it is committed.
        let header = unsafe { &*entry.header.get() };
        entry.commit_id = header.ent.commit_id;
        let payload = header.ent.payload_sz as usize;
        let word = |at: usize| u32::from_ne_bytes(header.in_out[at..at + 4].try_into().expect("4"));
        let (len, opcode) = (word(0) as usize, word(4));
        let reply = RingReply {
            slot: entry.slot.clone(),
            entry: index,
            waker: self.waker.clone(),
        };
        // The kernel's total length counts the per-operation header, which
        // is what remains once the fixed header and the payload are taken.
        let op_in = len
            .checked_sub(IN_HEADER + payload)
            .filter(|&n| n <= 128 && payload <= entry.iov[1].iov_len);
        let Some(op_in) = op_in else {
            error!("FUSE queue: a request of {len} bytes with a payload of {payload}");
            return refuse(&reply, entry.commit_id);
        };
        let start = FRONT - IN_HEADER - op_in;
        let mut front = [0u8; FRONT];
        front[..IN_HEADER].copy_from_slice(&header.in_out[..IN_HEADER]);
        front[IN_HEADER..IN_HEADER + op_in].copy_from_slice(&header.op_in[..op_in]);
        let long = may_take_long(opcode);
        let bytes = entry.bytes();
        bytes[start..FRONT].copy_from_slice(&front[..IN_HEADER + op_in]);
        let request = &bytes[start..FRONT + payload];
        if long {
            let len = request.len();
            let mut words = vec![0u64; len.div_ceil(8)];
            words.as_mut_bytes()[..len].copy_from_slice(request);
            if let Err(std::sync::mpsc::SendError(job)) =
                self.offload.send(Offloaded { words, len, reply })
            {
                refuse(&job.reply, entry.commit_id);
            }
            return;
        }
        run(event_loop, request, reply);
    }

    fn register_sqe(&self, entry: &Entry) -> squeue::Entry128 {
        let sqe = opcode::UringCmd80::new(types::Fd(self.fuse_fd), CMD_REGISTER)
            .cmd(cmd_req(0, self.qid))
            .addr(Some(entry.iov.as_ptr() as u64))
            .build();
        with_len(sqe, 2)
    }

    fn commit_sqe(&self, commit_id: u64) -> squeue::Entry128 {
        opcode::UringCmd80::new(types::Fd(self.fuse_fd), CMD_COMMIT_AND_FETCH)
            .cmd(cmd_req(commit_id, self.qid))
            .build()
    }

    fn arm_wake(&self, ring: &mut Ring) -> io::Result<()> {
        let poll = opcode::PollAdd::new(
            types::Fd(self.waker.eventfd.as_raw_fd()),
            libc::POLLIN as u32,
        )
        .build()
        .user_data(WAKE);
        push(ring, poll.into())
    }
}

/// Parses and dispatches one request whose reply goes to a queue.
fn run<FS: Filesystem>(event_loop: &SessionEventLoop<FS>, request: &[u8], reply: RingReply) {
    let unique = request
        .get(8..16)
        .map_or(0, |b| u64::from_ne_bytes(b.try_into().expect("8 bytes")));
    let Some(request) = RequestWithSender::new(event_loop.ch.sender(), request) else {
        return refuse(&reply, unique);
    };
    let request = request.with_ring_reply(reply);
    if let Ok(Operation::Destroy(_)) = request.request.operation() {
        request.reply::<ReplyEmpty>().ok();
    } else {
        request.dispatch(event_loop);
    }
}

/// Answers a request that cannot be parsed with EIO: unanswered, it would
/// hold its caller forever.
fn refuse(reply: &RingReply, unique: u64) {
    let _ = reply.send(&[IoSlice::new(&eio_header(unique))]);
}

/// A `fuse_out_header` answering request `unique` with EIO.
fn eio_header(unique: u64) -> [u8; OUT_HEADER] {
    let mut out = [0u8; OUT_HEADER];
    out[..4].copy_from_slice(&(OUT_HEADER as u32).to_ne_bytes());
    out[4..8].copy_from_slice(&(-libc::EIO).to_ne_bytes());
    out[8..].copy_from_slice(&unique.to_ne_bytes());
    out
}

/// Copies the staged reply of `entry` into its buffers.
fn commit(entry: &mut Entry) {
    let Some(reply) = entry.slot.reply.lock().take() else {
        return;
    };
    let (out, body) = reply.split_at(OUT_HEADER.min(reply.len()));
    let fits = body.len() <= entry.iov[1].iov_len;
    if fits {
        entry.bytes()[FRONT..FRONT + body.len()].copy_from_slice(body);
    }
    // SAFETY: the kernel is done with the entry until it is committed.
    let header = unsafe { &mut *entry.header.get() };
    header.in_out[..out.len()].copy_from_slice(out);
    if fits {
        header.ent.payload_sz = body.len() as u32;
    } else {
        error!(
            "a FUSE reply of {} bytes does not fit the ring buffer",
            body.len()
        );
        header.in_out[..OUT_HEADER].copy_from_slice(&eio_header(entry.commit_id));
        header.ent.payload_sz = 0;
    }
    *entry.slot.spare.lock() = reply;
}

/// Sets the SQE's `len` field, which `UringCmd80` has no builder for: a
/// register command carries its two iovecs in `addr` and `len`.
fn with_len(sqe: squeue::Entry128, len: u32) -> squeue::Entry128 {
    // SAFETY: an Entry128 is the kernel's 128-byte `io_uring_sqe`, plain
    // data; `len` is the u32 at byte 24.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
    raw[24..28].copy_from_slice(&len.to_ne_bytes());
    unsafe { std::mem::transmute(raw) }
}

fn push(ring: &mut Ring, sqe: squeue::Entry128) -> io::Result<()> {
    // SAFETY: every buffer an SQE names (an entry's iovecs and buffers) is
    // owned by `serve` and outlives the ring.
    unsafe { ring.submission().push(&sqe) }
        .map_err(|_| io::Error::other("FUSE queue: submission queue full"))
}
