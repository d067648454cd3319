//! What a client's handles and background tasks share: the settings, the
//! connectors, the master state (see [`crate::state`]) and single-flight
//! rediscovery.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};

use redis::aio::MultiplexedConnection;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::addr::NodeAddr;
use crate::builder::{FailoverClientBuilder, Mode};
use crate::events::{Event, Telemetry, Trigger};
use crate::node::{Connector, MasterCheck};
use crate::restarts::Restarts;
use crate::state::{Found, Master, MasterState, Observed, Opened};

/// The sentinels to ask, and how.
pub(crate) struct Sentinels {
    pub(crate) connector: Connector,
    /// Those known: configured, then grown from `SENTINEL SENTINELS`.
    pub(crate) known: Mutex<Vec<NodeAddr>>,
    /// Open connections to them, dropped when they fail.
    pub(crate) connections: Mutex<HashMap<NodeAddr, MultiplexedConnection>>,
}

pub(crate) struct Shared {
    pub(crate) settings: FailoverClientBuilder,
    pub(crate) data: Connector,
    pub(crate) sentinels: Sentinels,
    pub(crate) state: MasterState,
    pub(crate) telemetry: Arc<Telemetry>,
    /// Where `ReadPolicy::RoundRobin` goes next.
    pub(crate) round_robin: AtomicUsize,
    /// Whether the replica probes run (they start on first need).
    pub(crate) tracking: AtomicBool,
    /// How many rounds of replica probes have completed.
    pub(crate) probe_rounds: watch::Sender<u64>,
    /// Who each master was, to tell a restart from a reconnection.
    pub(crate) restarts: Restarts,
    stopped: CancellationToken,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("mode", &self.settings.mode)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// `stopped` is cancelled when the client is dropped; background
    /// tasks started later watch it.
    pub(crate) fn new(settings: FailoverClientBuilder, stopped: CancellationToken) -> Self {
        let connector = |credentials, tls| {
            Connector::new(
                Arc::clone(&settings.resolver),
                credentials,
                tls,
                settings.connect_timeout,
                settings.command_timeout,
            )
        };
        let data = connector(settings.credentials.clone(), settings.tls.clone());
        let sentinels = Sentinels {
            connector: connector(
                settings.sentinel_credentials.clone(),
                settings.sentinel_tls.clone(),
            ),
            known: Mutex::new(match &settings.mode {
                Mode::Sentinel { sentinels, .. } => sentinels.clone(),
                Mode::Candidates { .. } => Vec::new(),
            }),
            connections: Mutex::default(),
        };
        let telemetry = Arc::new(Telemetry::new(settings.event_capacity));
        Self {
            state: MasterState::new(Arc::clone(&telemetry)),
            telemetry,
            settings,
            data,
            sentinels,
            round_robin: AtomicUsize::new(0),
            tracking: AtomicBool::new(false),
            probe_rounds: watch::channel(0).0,
            restarts: Restarts::default(),
            stopped,
        }
    }

    /// Cancelled when the client is dropped.
    pub(crate) fn stopped(&self) -> CancellationToken {
        self.stopped.clone()
    }

    /// Wakes on every master installed, with its generation.
    pub(crate) fn subscribe_installed(&self) -> watch::Receiver<u64> {
        self.state.installed()
    }

    pub(crate) fn emit(&self, event: Event) {
        self.telemetry.emit(event);
    }

    /// How a node proves it is master: Sentinel's answers are always
    /// confirmed with `ROLE`; candidates use the configured check.
    pub(crate) fn master_check(&self) -> MasterCheck {
        match &self.settings.mode {
            Mode::Candidates { .. } => self.settings.master_check,
            Mode::Sentinel { .. } => MasterCheck::Role,
        }
    }

    /// The master to use now (finding one if none is known) and the
    /// discovery epoch it was observed at. The search is boxed: its
    /// future would otherwise size every request's, which is moved into
    /// a box per request.
    pub(crate) async fn current(&self) -> Found {
        match self.state.observe() {
            Observed {
                master: Some(master),
                epoch,
            } => Ok((master, epoch)),
            Observed {
                master: None,
                epoch,
            } => Box::pin(self.rediscover(epoch, Trigger::NoMaster, None)).await,
        }
    }

    /// Starts a rediscovery without making the caller wait for it.
    pub(crate) fn rediscover_in_background(
        self: &Arc<Self>,
        epoch: u64,
        trigger: Trigger,
        failed: Arc<Master>,
    ) {
        let shared = Arc::clone(self);
        tokio::spawn(async move {
            let _ = shared.rediscover(epoch, trigger, Some(&failed)).await;
        });
    }

    /// Looks for the master again, unless a discovery finished since the
    /// caller observed `epoch`: then its outcome is the answer. One
    /// discovery runs at a time, so a burst of failures causes one.
    /// `failed` is the master the caller saw fail, if any.
    pub(crate) async fn rediscover(
        &self,
        epoch: u64,
        trigger: Trigger,
        failed: Option<&Arc<Master>>,
    ) -> Found {
        let mut discovery = match self.state.begin(epoch).await {
            Ok(discovery) => discovery,
            Err(found) => return found,
        };
        discovery.saw_failure(failed, trigger);
        let found = self
            .find_master(discovery.current())
            .instrument(tracing::debug_span!("discover", ?trigger))
            .await;
        match found {
            Ok(Opened::Same(master)) => Ok(discovery.keep(master)),
            Ok(Opened::New(new)) => Ok(discovery.install(new, trigger)),
            Err(failures) => Err(discovery.not_found(failures, trigger)),
        }
    }
}
