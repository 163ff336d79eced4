//! The loop: the IO edges, the ticker, the probes and the data plane's log
//! started; then every event handled in order, until a signal or
//! `detach`. The tick (200 ms) drives the store's upkeep, the guards, and
//! once a second the interfaces, the routing rules and the transitions.

use std::{ffi::CString, io, os::unix::fs::PermissionsExt as _, time::Duration};

use anyhow::Context as _;
use tokio::{net::UnixListener, sync::mpsc};

use super::{
    changes::history_response,
    kernel_log::{kernel_log_loop, KernelLog},
    server, Daemon, Event, StatusWaiter,
};
use crate::api::Request;

/// How often watches and confirmation deadlines are checked.
const TICK: Duration = Duration::from_millis(200);

/// How long the daemon waits, after a detach, for its answer to be written.
const DETACH_ANSWER_WAIT: Duration = Duration::from_secs(2);

impl Daemon {
    /// Serves the control socket until a signal or `detach`.
    pub async fn run(mut self) -> anyhow::Result<()> {
        let listener = self.bind_socket()?;
        let (tx, mut rx) = mpsc::channel::<Event>(1024);
        self.tx = Some(tx.clone());
        let mut tasks = vec![
            tokio::spawn(server::accept_loop(listener, tx.clone(), self.socket_gid)),
            tokio::spawn({
                let tx = tx.clone();
                async move {
                    let _ = server::signal_loop(tx).await;
                }
            }),
        ];
        if let Some(mut changes) = self.store.changes() {
            let tx = tx.clone();
            tasks.push(tokio::spawn(async move {
                while let Some(c) = changes.recv().await {
                    if tx.send(Event::Followed(c)).await.is_err() {
                        return;
                    }
                }
            }));
        }
        let ticker = self.tx.clone().expect("set above");
        tasks.push(tokio::spawn(async move {
            let mut t = tokio::time::interval(TICK);
            loop {
                t.tick().await;
                if ticker.send(Event::Tick).await.is_err() {
                    return;
                }
            }
        }));
        if let Some(addr) = self.config.metrics_listen {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("metrics_listen {addr}"))?;
            log::info!("Prometheus metrics on http://{addr}/metrics");
            tasks.push(tokio::spawn(server::metrics_loop(
                l,
                self.tx.clone().expect("set"),
            )));
        }
        match self.dataplane.kernel_log(KernelLog) {
            // SAFETY: the reader owns the ring buffer's map fd, which stays
            // open and the same for the reader's life, and the AsyncFd owns
            // the reader.
            Ok(reader) => match unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(
                    reader,
                    tokio::io::Interest::READABLE,
                )
            } {
                Ok(fd) => tasks.push(tokio::spawn(kernel_log_loop(fd))),
                Err(e) => log::warn!("the data plane's log: {e}; its messages will not be shown"),
            },
            Err(e) => log::warn!("{e}; its messages will not be shown"),
        }
        self.start_probes();
        self.publish_report();
        log::info!(
            "bgswitch daemon ready: {} services, interfaces {:?}, socket {}",
            self.config.services.len(),
            self.config.interfaces,
            self.config.socket.display()
        );
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Request {
                    req: Request::Status { service },
                    peer,
                    reply,
                    written: _,
                } if service
                    .as_deref()
                    .is_none_or(|n| self.state.service(n).is_ok()) =>
                {
                    log::debug!(
                        "{peer}: status{}",
                        service
                            .as_deref()
                            .map(|s| format!(" of {s}"))
                            .unwrap_or_default()
                    );
                    self.status_request(StatusWaiter::Status {
                        only: service,
                        reply,
                    });
                }
                Event::Request {
                    req: Request::History { service },
                    peer,
                    reply,
                    written: _,
                } if self.state.service(&service).is_ok() => {
                    // The journal is read on a blocking thread: a long one
                    // must not hold up flips.
                    log::debug!("{peer}: history of {service}");
                    let read = self.store.history();
                    tokio::task::spawn_blocking(move || {
                        let _ = reply.send(history_response(read, &service));
                    });
                }
                Event::Request {
                    req: Request::Fleet,
                    peer,
                    reply,
                    written: _,
                } if self.store.fleet_local().is_some() => {
                    // etcd is read on a blocking thread.
                    log::debug!("{peer}: status --fleet");
                    if let Some(read) = self.store.fleet() {
                        tokio::task::spawn_blocking(move || {
                            let _ = reply.send(match read() {
                                Ok(f) => crate::api::Response {
                                    ok: true,
                                    fleet: Some(f),
                                    ..Default::default()
                                },
                                Err(e) => crate::api::Response::error(format!(
                                    "the fleet's state: etcd: {e}"
                                )),
                            });
                        });
                    }
                }
                Event::Request {
                    req,
                    peer,
                    reply,
                    written: _,
                } if self.needs_checks(&req) => self.start_gate(req, peer, reply),
                Event::Gated { gate, records } => self.on_gated(gate, records),
                Event::WatchChecked {
                    service,
                    generation,
                    record,
                } => self.on_watch_checked(&service, generation, record),
                Event::Request {
                    req,
                    peer,
                    reply,
                    written,
                } => {
                    let detach = matches!(req, Request::Detach);
                    let resp = self.handle(req, &peer);
                    let done = detach && resp.ok;
                    let _ = reply.send(resp);
                    if done {
                        // The connection task writes the answer before the
                        // runtime (and the task) goes away; a client that
                        // does not read it is not waited for long.
                        let _ = tokio::time::timeout(DETACH_ANSWER_WAIT, written).await;
                        break;
                    }
                }
                Event::Probe {
                    service,
                    colour,
                    index,
                    result,
                } => self.on_probe(&service, colour, index, result),
                Event::Tick => self.on_tick(),
                Event::Scrape { reply } => self.status_request(StatusWaiter::Scrape { reply }),
                Event::FlowsCounted {
                    counts,
                    waiters,
                    words,
                    at,
                } => self.flows_counted(counts, waiters, words, at),
                Event::Reload => {
                    let r = self.reload();
                    if !r.ok {
                        log::error!("reload on SIGHUP refused: {}", r.error.unwrap_or_default());
                    }
                }
                Event::Followed(change) => self.follow(change),
                Event::Shutdown(sig) => {
                    log::info!(
                        "{sig}: exiting; the data plane stays attached and keeps switching on the last state"
                    );
                    self.store.close(&self.state);
                    break;
                }
            }
        }
        for t in tasks.into_iter().chain(self.probes.drain(..)) {
            t.abort();
        }
        let _ = std::fs::remove_file(&self.config.socket);
        Ok(())
    }

    fn bind_socket(&self) -> anyhow::Result<UnixListener> {
        let path = &self.config.socket;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => log::info!("removed stale socket {}", path.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing stale {}", path.display())),
        }
        let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
            .with_context(|| format!("chmod 0660 {}", path.display()))?;
        if let Some(gid) = self.socket_gid {
            let c = CString::new(path.as_os_str().as_encoded_bytes())?;
            // SAFETY: valid path; uid -1 keeps the owner.
            if unsafe { libc::chown(c.as_ptr(), u32::MAX, gid) } != 0 {
                return Err(io::Error::last_os_error())
                    .with_context(|| format!("chgrp {} to gid {gid}", path.display()));
            }
        }
        Ok(l)
    }

    /// The store's upkeep and the guards; every second, the interfaces,
    /// the routing rules, the transitions that may end and the flow
    /// table's pressure.
    fn on_tick(&mut self) {
        self.ticks += 1;
        self.store.upkeep(&self.state);
        if self.ticks.is_multiple_of(5) {
            for (level, note) in self.dataplane.check_interfaces() {
                log::log!(level, "{note}");
            }
            self.check_rules();
            self.scan_for_transitions();
            self.check_pressure();
            self.publish_report();
        }
        self.check_guards();
        self.run_watch_checks();
    }
}
