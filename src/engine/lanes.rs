//! Which session an encoder's next batch runs on. A model with narrow lanes (one-thread sessions
//! sharing its weights, `SessionPool::narrow`) treats the shared pool's cores as a budget: a
//! batch that runs alone takes every core on the wide session, and batches under load take one
//! core each on a narrow session. Two one-thread runs side by side do not meet after every
//! operator as one two-thread run does, so under load they go further (bench/RESULTS.md), while a
//! lone request still gets every core.

use std::sync::Arc;

use ort::session::Session;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::runtime::SessionPool;
use crate::runtime::session::SessionLease;

/// The sessions of one encoder version, and the cores its runs may take.
pub struct Lanes {
    wide: Arc<SessionPool>,
    split: Option<Split>,
}

struct Split {
    narrow: Arc<SessionPool>,
    /// One permit per core of the shared pool, held by the runs in flight.
    cores: Arc<Semaphore>,
}

/// What the batcher holds while a batch gathers: a session, or one core of the budget.
pub enum Turn {
    Session(SessionLease),
    Core(OwnedSemaphorePermit),
}

/// A session to run one batch on, and the cores the run holds until it ends.
pub struct LaneLease {
    session: SessionLease,
    cores: Option<OwnedSemaphorePermit>,
    lane: Lane,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// The sessions on the shared pool, each run spread over all its threads.
    Wide,
    /// The one-thread sessions.
    Narrow,
}

impl Lane {
    pub fn name(self) -> &'static str {
        match self {
            Lane::Wide => "wide",
            Lane::Narrow => "narrow",
        }
    }
}

impl Lanes {
    pub fn new(pool: Arc<SessionPool>) -> Self {
        let split = pool.narrow().map(|narrow| Split {
            narrow: Arc::clone(narrow),
            cores: Arc::new(Semaphore::new(narrow.size())),
        });
        Self { wide: pool, split }
    }

    /// How many batches may run at once, to spread a queue over.
    pub fn parallel(&self) -> usize {
        match &self.split {
            Some(split) => split.narrow.size(),
            None => self.wide.size(),
        }
    }

    /// Waits until a batch could start: a free session, or with lanes, a free core.
    pub async fn turn(&self) -> Turn {
        match &self.split {
            Some(split) => Turn::Core(
                Arc::clone(&split.cores)
                    .acquire_owned()
                    .await
                    .expect("the core budget never closes"),
            ),
            None => Turn::Session(self.wide.acquire().await),
        }
    }

    /// The session for a batch formed on `turn`. `alone`: nothing else waits in the queue. Such
    /// a batch, with no other run in flight, takes every core on the wide session; otherwise it
    /// runs on one core.
    pub async fn lease(&self, turn: Turn, alone: bool) -> LaneLease {
        let (split, mut core) = match (turn, &self.split) {
            (Turn::Session(session), _) => {
                return LaneLease {
                    session,
                    cores: None,
                    lane: Lane::Wide,
                };
            }
            (Turn::Core(core), Some(split)) => (split, core),
            (Turn::Core(_), None) => unreachable!("cores are handed out only with lanes"),
        };
        let others = split.narrow.size() as u32 - 1;
        let rest = match alone {
            true => Arc::clone(&split.cores).try_acquire_many_owned(others).ok(),
            false => None,
        };
        match rest {
            Some(rest) => {
                core.merge(rest);
                LaneLease {
                    // Holding every core, no other run is in flight: the session is free.
                    session: self.wide.acquire().await,
                    cores: Some(core),
                    lane: Lane::Wide,
                }
            }
            None => LaneLease {
                // One narrow session per core: the core held guarantees a free one.
                session: split.narrow.acquire().await,
                cores: Some(core),
                lane: Lane::Narrow,
            },
        }
    }
}

impl LaneLease {
    pub fn lane(&self) -> Lane {
        self.lane
    }

    /// Runs `work` on the leased session (on the blocking pool); the cores are free once it ends.
    pub async fn run<R: Send + 'static>(
        self,
        work: impl FnOnce(&mut Session) -> R + Send + 'static,
    ) -> crate::error::Result<R> {
        let result = self.session.run(work).await;
        drop(self.cores);
        result
    }
}
