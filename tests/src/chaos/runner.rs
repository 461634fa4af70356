//! The fault runner: injects the schedule's faults at their moments, restores their targets
//! when due, restarts what exited by itself, and records what it did ([`Done`]).
//!
//! Process faults are signals; network faults set the fault proxies of a [`Link`] and are
//! lifted when due, one aspect at a time (a latency lifted never ends a blackout that began
//! meanwhile). A fault whose target is busy (down, or the same aspect of the same link already
//! faulted) waits and is tried again.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::faults::{Consumer, Done, FaultKind, Link, Planned};
use super::now_ms;
use super::observe::TopicTail;
use super::stack::{self, Stack};
use super::workload::Truth;

/// What is due to be restored, and when.
enum Restore {
    Producer(usize),
    Consumer(Consumer),
    KafkaNode(u32),
    /// Lift one aspect of a link's network fault.
    Net(Link, Lift),
}

/// An aspect of a network fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lift {
    Latency,
    Bandwidth,
    Blackout,
    HttpErrors,
}

/// The runner of one fault window.
pub struct Runner<'a> {
    stack: &'a mut Stack,
    tails: &'a [TopicTail],
    done: Vec<Done>,
    pending: Vec<(Instant, Restore, usize)>,
    /// Exits nobody asked for: process names.
    unexpected_exits: Vec<String>,
    /// Session breaks of producers that exited by themselves.
    self_breaks: Vec<(usize, u64)>,
    /// When the last Kafka stall ended: no immediate restart of Postgres for a minute after
    /// it, since a restart takes the slot back to its last saved position and would send
    /// again what a producer confirming too early lost in the stall (hiding the loss).
    last_stall: Option<Instant>,
}

impl Runner<'_> {
    fn record(&mut self, kind: FaultKind, detail: String, breaks: Vec<(usize, u64)>) -> usize {
        self.done.push(Done {
            kind,
            at_ms: now_ms(),
            restored_ms: now_ms(),
            detail,
            breaks,
        });
        self.done.len() - 1
    }

    async fn confirmed(&self, producer: usize) -> Vec<(usize, u64)> {
        let slot = &self.stack.producers[producer].slot;
        self.stack
            .confirmed(slot)
            .await
            .map(|c| vec![(producer, c)])
            .unwrap_or_default()
    }

    /// Injects `p`; `false` when its target is not in a state to take it (try again later).
    pub async fn inject(&mut self, p: &Planned) -> anyhow::Result<bool> {
        let now = Instant::now();
        let down = Duration::from_millis(p.down_ms);
        match p.kind {
            FaultKind::ProducerKill | FaultKind::ProducerTerm => {
                let i = p.target.min(self.stack.producers.len() - 1);
                if !self.stack.producers[i].proc.running() {
                    return Ok(false);
                }
                let at = now_ms();
                let detail = if p.kind == FaultKind::ProducerKill {
                    self.stack.producers[i].proc.kill9();
                    format!("SIGKILL producer {}", self.stack.producers[i].mode)
                } else {
                    let code = self.stack.producers[i]
                        .proc
                        .term(Duration::from_secs(40))
                        .await;
                    format!(
                        "SIGTERM producer {}: exit {code:?}",
                        self.stack.producers[i].mode
                    )
                };
                let breaks = self.confirmed(i).await;
                let n = self.record(p.kind, detail, breaks);
                self.done[n].at_ms = at;
                let label = format!("{} #{n}", p.kind.label());
                self.tails[i].sample(&label, Duration::from_secs(6)).await;
                self.pending.push((now + down, Restore::Producer(i), n));
            }
            FaultKind::ProducerFreeze => {
                let i = p.target.min(self.stack.producers.len() - 1);
                let Some(pid) = self.stack.producers[i]
                    .proc
                    .running()
                    .then(|| self.stack.producers[i].proc.pid())
                    .flatten()
                else {
                    return Ok(false);
                };
                let at = now_ms();
                stack::signal(pid, "-STOP");
                // wal_sender_timeout is 5 s: Postgres drops the frozen session.
                tokio::time::sleep(Duration::from_secs(8)).await;
                let breaks = self.confirmed(i).await;
                stack::signal(pid, "-CONT");
                let n = self.record(
                    p.kind,
                    format!("SIGSTOP producer {} for 8 s", self.stack.producers[i].mode),
                    breaks,
                );
                self.done[n].at_ms = at;
            }
            FaultKind::ConsumerKill(c) | FaultKind::ConsumerTerm(c) => {
                let m = self.stack.consumers.get_mut(&c).context("consumer")?;
                if !m.running() {
                    return Ok(false);
                }
                let at = now_ms();
                let detail = if matches!(p.kind, FaultKind::ConsumerKill(_)) {
                    m.kill9();
                    format!("SIGKILL {}", c.name())
                } else {
                    let code = m.term(Duration::from_secs(40)).await;
                    format!("SIGTERM {}: exit {code:?}", c.name())
                };
                let n = self.record(p.kind, detail, Vec::new());
                self.done[n].at_ms = at;
                self.pending.push((now + down, Restore::Consumer(c), n));
            }
            FaultKind::KafkaLeaderKill => {
                let topic = self.stack.producers[0].topic.clone();
                let kafka = Arc::clone(&self.stack.kafka);
                let healthy = tokio::task::block_in_place(|| self.stack.kafka_healthy());
                let leader = if healthy {
                    tokio::task::block_in_place(|| kafka.leader_of(&topic, p.target as i32))
                } else {
                    None
                };
                let Some(leader) = leader else {
                    return Ok(false);
                };
                tokio::task::block_in_place(|| kafka.kill_node(leader));
                let n = self.record(
                    p.kind,
                    format!(
                        "SIGKILL Kafka node {leader}, leader of partition {}",
                        p.target
                    ),
                    Vec::new(),
                );
                self.pending
                    .push((now + down, Restore::KafkaNode(leader), n));
            }
            FaultKind::KafkaPauseProducerKill => {
                // The producer must be streaming (not starting up) for the stall to leave it
                // with read, unacknowledged transactions when it is killed.
                let settled = self.stack.producers[0]
                    .proc
                    .started_at
                    .is_some_and(|t| t.elapsed() > Duration::from_secs(5));
                if !self.stack.producers[0].proc.running()
                    || !settled
                    || !self.stack.slot_active(&self.stack.producers[0].slot).await
                {
                    return Ok(false);
                }
                let before = self.confirmed(0).await;
                let pids = self.stack.kafka_pids();
                if pids.len() != 3 {
                    eprintln!(
                        "chaos: {} of 3 Kafka processes found; the pause waits",
                        pids.len()
                    );
                    return Ok(false);
                }
                let at = now_ms();
                for pid in &pids {
                    stack::signal(*pid, "-STOP");
                }
                tokio::time::sleep(down / 2).await;
                self.stack.producers[0].proc.kill9();
                let breaks = self.confirmed(0).await;
                tokio::time::sleep(down / 2).await;
                for pid in &pids {
                    stack::signal(*pid, "-CONT");
                }
                self.last_stall = Some(Instant::now());
                let n = self.record(
                    p.kind,
                    format!(
                        "SIGSTOP Kafka nodes for {:.1} s, SIGKILL producer {} in the middle (slot confirmed {:?} before)",
                        down.as_secs_f64(),
                        self.stack.producers[0].mode,
                        before.first().map(|b| b.1)
                    ),
                    breaks,
                );
                self.done[n].at_ms = at;
                self.pending.push((
                    Instant::now() + Duration::from_millis(500),
                    Restore::Producer(0),
                    n,
                ));
            }
            FaultKind::PostgresRestart => {
                if self
                    .last_stall
                    .is_some_and(|t| t.elapsed() < Duration::from_secs(60))
                {
                    return Ok(false);
                }
                let at = now_ms();
                tokio::task::block_in_place(|| self.stack.restart_postgres())?;
                let mut breaks = Vec::new();
                for i in 0..self.stack.producers.len() {
                    breaks.extend(self.confirmed(i).await);
                }
                let n = self.record(p.kind, "pg_ctl restart -m immediate".into(), breaks);
                self.done[n].at_ms = at;
            }
            FaultKind::NetLatency
            | FaultKind::NetBandwidth
            | FaultKind::NetCut
            | FaultKind::KafkaBlackout
            | FaultKind::SearchStall
            | FaultKind::SearchErrors => return self.inject_net(p),
            FaultKind::KafkaLongOutage => {
                bail!("kafka_long_outage is a phase after the checks, never scheduled")
            }
        }
        Ok(true)
    }

    /// A network fault: sets the link's proxies, and schedules the lift.
    fn inject_net(&mut self, p: &Planned) -> anyhow::Result<bool> {
        let down = Duration::from_millis(p.down_ms);
        let scheduled = Link::ALL[p.target % Link::ALL.len()];
        let (link, lift) = match p.kind {
            FaultKind::NetLatency => (scheduled, Some(Lift::Latency)),
            FaultKind::NetBandwidth => (scheduled, Some(Lift::Bandwidth)),
            FaultKind::NetCut => (scheduled, None),
            FaultKind::KafkaBlackout => (Link::Kafka, Some(Lift::Blackout)),
            FaultKind::SearchStall => (Link::Search, Some(Lift::Blackout)),
            FaultKind::SearchErrors => (Link::Search, Some(Lift::HttpErrors)),
            other => bail!("{} is not a network fault", other.label()),
        };
        if let Some(l) = lift
            && self
                .pending
                .iter()
                .any(|(_, r, _)| matches!(r, Restore::Net(k, m) if *k == link && *m == l))
        {
            return Ok(false);
        }
        let proxies = self.stack.links.get(&link).cloned().unwrap_or_default();
        if proxies.is_empty() {
            bail!("no fault proxy on the {} link", link.name());
        }
        let secs = down.as_secs_f64();
        let detail = match p.kind {
            FaultKind::NetLatency => {
                proxies
                    .iter()
                    .for_each(|x| x.latency(Duration::from_millis(p.param)));
                format!(
                    "{} ms latency each way on the {} link for {secs:.0} s",
                    p.param,
                    link.name()
                )
            }
            FaultKind::NetBandwidth => {
                proxies.iter().for_each(|x| x.bandwidth(p.param));
                format!(
                    "{} KiB/s each way on the {} link for {secs:.0} s",
                    p.param / 1024,
                    link.name()
                )
            }
            FaultKind::NetCut => {
                proxies.iter().for_each(|x| x.cut());
                format!("every connection of the {} link reset", link.name())
            }
            FaultKind::SearchErrors => {
                let status = u16::try_from(p.param).context("an HTTP status")?;
                proxies.iter().for_each(|x| x.http_errors(status));
                format!("OpenSearch answers HTTP {status} to everything for {secs:.0} s")
            }
            _ => {
                proxies.iter().for_each(|x| x.blackout());
                format!("the {} link hung for {secs:.0} s", link.name())
            }
        };
        let n = self.record(p.kind, detail, Vec::new());
        if let Some(l) = lift {
            self.pending
                .push((Instant::now() + down, Restore::Net(link, l), n));
        }
        Ok(true)
    }

    fn restore(&mut self, r: Restore, n: usize) {
        match r {
            Restore::Producer(i) => self.stack.producers[i].proc.start(),
            Restore::Consumer(c) => {
                if let Some(m) = self.stack.consumers.get_mut(&c) {
                    m.start();
                }
            }
            Restore::KafkaNode(id) => self.stack.kafka.restart_node(id),
            Restore::Net(link, lift) => {
                for x in self.stack.links.get(&link).into_iter().flatten() {
                    match lift {
                        Lift::Latency => x.latency(Duration::ZERO),
                        Lift::Bandwidth => x.unlimited(),
                        Lift::Blackout => x.restore(),
                        Lift::HttpErrors => x.http_ok(),
                    }
                }
            }
        }
        if let Some(d) = self.done.get_mut(n) {
            d.restored_ms = now_ms();
        }
    }

    /// Restores what is due (all of it when `all`), and restarts a process that exited by
    /// itself (noted).
    pub async fn tend(&mut self, all: bool) {
        let now = Instant::now();
        let mut keep = Vec::new();
        for (due, r, n) in std::mem::take(&mut self.pending) {
            if all || due <= now {
                self.restore(r, n);
            } else {
                keep.push((due, r, n));
            }
        }
        self.pending = keep;
        let waiting: Vec<usize> = self
            .pending
            .iter()
            .filter_map(|(_, r, _)| match r {
                Restore::Producer(i) => Some(*i),
                _ => None,
            })
            .collect();
        for i in 0..self.stack.producers.len() {
            let p = &mut self.stack.producers[i].proc;
            if !waiting.contains(&i) && p.starts > 0 && !p.running() {
                self.unexpected_exits.push(p.name.clone());
                eprintln!(
                    "chaos: {} exited by itself; restarting\n{}",
                    p.name,
                    p.log_tail(5)
                );
                // A session break all the same, for the duplicate window.
                let breaks = self.confirmed(i).await;
                self.self_breaks.extend(breaks);
                self.stack.producers[i].proc.start();
            }
        }
        let waiting_c: Vec<Consumer> = self
            .pending
            .iter()
            .filter_map(|(_, r, _)| match r {
                Restore::Consumer(c) => Some(*c),
                _ => None,
            })
            .collect();
        for (c, m) in self.stack.consumers.iter_mut() {
            if !waiting_c.contains(c) && m.starts > 0 && !m.running() {
                self.unexpected_exits.push(m.name.clone());
                eprintln!(
                    "chaos: {} exited by itself; restarting\n{}",
                    m.name,
                    m.log_tail(5)
                );
                m.start();
            }
        }
    }
}

impl<'a> Runner<'a> {
    /// A runner over `stack`; `tails[i]` reads producer `i`'s topic.
    pub fn new(stack: &'a mut Stack, tails: &'a [TopicTail]) -> Self {
        Self {
            stack,
            tails,
            done: Vec::new(),
            pending: Vec::new(),
            unexpected_exits: Vec::new(),
            self_breaks: Vec::new(),
            last_stall: None,
        }
    }

    /// Runs the schedule for `window` (faults not injected by then are dropped; a fault whose
    /// target is down or busy is tried again a second later).
    pub async fn run(
        &mut self,
        planned: &[Planned],
        window: Duration,
        truth: &Truth,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut queue: VecDeque<Planned> = planned.iter().cloned().collect();
        let mut last_progress = Instant::now();
        while started.elapsed() < window {
            self.tend(false).await;
            if let Some(next) = queue.front()
                && started.elapsed() >= Duration::from_millis(next.at_ms)
            {
                let mut p = queue.pop_front().context("queue")?;
                if !self.inject(&p).await? {
                    p.at_ms = started.elapsed().as_millis() as u64 + 1000;
                    let at = queue.partition_point(|q| q.at_ms <= p.at_ms);
                    queue.insert(at, p);
                }
            }
            if last_progress.elapsed() > Duration::from_secs(30) {
                last_progress = Instant::now();
                eprintln!(
                    "chaos: {:.0} s, {} faults injected, {} transactions committed",
                    started.elapsed().as_secs_f64(),
                    self.done.len(),
                    truth.stats().committed
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // A kind not injected even once (its every fault waited on a busy target) gets up to
        // 90 s more, so that every kind is exercised.
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            let Some(i) = queue
                .iter()
                .position(|q| !self.done.iter().any(|d| d.kind == q.kind))
            else {
                break;
            };
            self.tend(false).await;
            let p = queue[i].clone();
            if self.inject(&p).await? {
                queue.remove(i);
            } else {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        Ok(())
    }

    /// Restores everything and returns what was done, the processes that exited by
    /// themselves, and the session breaks of producers that did.
    pub async fn finish(mut self) -> (Vec<Done>, Vec<String>, Vec<(usize, u64)>) {
        self.tend(true).await;
        (self.done, self.unexpected_exits, self.self_breaks)
    }
}
