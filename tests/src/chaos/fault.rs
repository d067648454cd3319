//! The faults a chaos round injects.

/// One fault injected in a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// kill -9 of the master (it comes back as a replica afterwards).
    KillMaster,
    /// SIGSTOP of the master past Sentinel's down-after, then SIGCONT.
    PauseMaster,
    /// `SENTINEL FAILOVER`.
    SentinelFailover,
    /// Every sentinel killed and restarted.
    RestartSentinels,
    /// One offloader aborted mid-work; another takes its place.
    KillOffloader,
    /// The receiver answers 500 for a while.
    Receiver500,
    /// The receiver answers 429 for a while.
    Receiver429,
    /// The receiver drops every connection for a while.
    ReceiverDown,
}

impl Fault {
    /// Every fault, in the order rounds cycle through them: master faults
    /// are spaced by others, as Sentinel waits between two failovers.
    pub const ALL: [Fault; 8] = [
        Fault::KillMaster,
        Fault::KillOffloader,
        Fault::Receiver500,
        Fault::PauseMaster,
        Fault::RestartSentinels,
        Fault::Receiver429,
        Fault::SentinelFailover,
        Fault::ReceiverDown,
    ];

    pub(super) fn name(self) -> &'static str {
        match self {
            Fault::KillMaster => "kill -9 master",
            Fault::PauseMaster => "SIGSTOP master",
            Fault::SentinelFailover => "SENTINEL FAILOVER",
            Fault::RestartSentinels => "restart sentinels",
            Fault::KillOffloader => "kill offloader",
            Fault::Receiver500 => "receiver 500",
            Fault::Receiver429 => "receiver 429",
            Fault::ReceiverDown => "receiver down",
        }
    }

    pub(super) fn changes_master(self) -> bool {
        matches!(
            self,
            Fault::KillMaster | Fault::PauseMaster | Fault::SentinelFailover
        )
    }
}
