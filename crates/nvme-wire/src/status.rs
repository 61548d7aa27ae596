//! NVMe completion status: status code type (SCT), status code (SC), and the
//! More / Do Not Retry / Command Retry Delay bits, with typed codes per type.

/// Status Code Type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatusCodeType {
    Generic,
    CommandSpecific,
    MediaError,
    Path,
    VendorSpecific,
    Reserved(u8),
}

impl StatusCodeType {
    pub fn from_bits(v: u8) -> Self {
        match v & 7 {
            0 => Self::Generic,
            1 => Self::CommandSpecific,
            2 => Self::MediaError,
            3 => Self::Path,
            7 => Self::VendorSpecific,
            r => Self::Reserved(r),
        }
    }
    pub fn bits(self) -> u8 {
        match self {
            Self::Generic => 0,
            Self::CommandSpecific => 1,
            Self::MediaError => 2,
            Self::Path => 3,
            Self::VendorSpecific => 7,
            Self::Reserved(r) => r & 7,
        }
    }
}

macro_rules! codes {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident = $c:expr),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum $name { $($(#[$vm])* $v = $c),* }
        impl $name {
            pub fn from_u8(v: u8) -> Option<Self> {
                match v { $($c => Some(Self::$v),)* _ => None }
            }
        }
    };
}

codes!(
    /// Generic command status (SCT 0), including the NVM command set codes 0x80...
    GenericStatus {
        Success = 0x00,
        InvalidOpcode = 0x01,
        InvalidField = 0x02,
        CommandIdConflict = 0x03,
        DataTransferError = 0x04,
        PowerLossAbort = 0x05,
        InternalError = 0x06,
        AbortRequested = 0x07,
        AbortedSqDeletion = 0x08,
        AbortedFailedFused = 0x09,
        AbortedMissingFused = 0x0A,
        InvalidNamespaceOrFormat = 0x0B,
        CommandSequenceError = 0x0C,
        InvalidSglSegmentDescriptor = 0x0D,
        InvalidNumberOfSglDescriptors = 0x0E,
        DataSglLengthInvalid = 0x0F,
        MetadataSglLengthInvalid = 0x10,
        SglDescriptorTypeInvalid = 0x11,
        InvalidUseOfCmb = 0x12,
        PrpOffsetInvalid = 0x13,
        AtomicWriteUnitExceeded = 0x14,
        OperationDenied = 0x15,
        SglOffsetInvalid = 0x16,
        HostIdInconsistentFormat = 0x18,
        KeepAliveExpired = 0x19,
        KeepAliveInvalid = 0x1A,
        AbortedPreempt = 0x1B,
        SanitizeFailed = 0x1C,
        SanitizeInProgress = 0x1D,
        SglDataBlockGranularityInvalid = 0x1E,
        NamespaceWriteProtected = 0x20,
        CommandInterrupted = 0x21,
        TransientTransportError = 0x22,
        LbaOutOfRange = 0x80,
        CapacityExceeded = 0x81,
        NamespaceNotReady = 0x82,
        ReservationConflict = 0x83,
        FormatInProgress = 0x84,
    }
);

codes!(
    /// Command specific status (SCT 1) for admin and fabrics commands.
    CommandSpecificStatus {
        CompletionQueueInvalid = 0x00,
        InvalidQueueIdentifier = 0x01,
        InvalidQueueSize = 0x02,
        AbortCommandLimitExceeded = 0x03,
        AsyncEventRequestLimitExceeded = 0x05,
        InvalidFirmwareSlot = 0x06,
        InvalidFirmwareImage = 0x07,
        InvalidInterruptVector = 0x08,
        InvalidLogPage = 0x09,
        InvalidFormat = 0x0A,
        FeatureIdNotSaveable = 0x0D,
        FeatureNotChangeable = 0x0E,
        FeatureNotNamespaceSpecific = 0x0F,
        NamespaceIdUnavailable = 0x16,
        /// Fabrics: Incompatible Format. (NVM I/O: Conflicting Attributes.)
        IncompatibleFormat = 0x80,
        /// Fabrics: Controller Busy. (NVM I/O: Invalid Protection Information.)
        ControllerBusy = 0x81,
        /// Fabrics: Connect Invalid Parameters. (NVM I/O: write to read-only range.)
        ConnectInvalidParameters = 0x82,
        ConnectRestartDiscovery = 0x83,
        ConnectInvalidHost = 0x84,
        InvalidQueueType = 0x90,
        AuthenticationRequired = 0x91,
    }
);

codes!(
    /// Media and data integrity errors (SCT 2).
    MediaStatus {
        WriteFault = 0x80,
        UnrecoveredReadError = 0x81,
        GuardCheckError = 0x82,
        ApplicationTagCheckError = 0x83,
        ReferenceTagCheckError = 0x84,
        CompareFailure = 0x85,
        AccessDenied = 0x86,
        DeallocatedOrUnwrittenBlock = 0x87,
    }
);

codes!(
    /// Path related status (SCT 3).
    PathStatus {
        InternalPathError = 0x00,
        AsymmetricAccessPersistentLoss = 0x01,
        AsymmetricAccessInaccessible = 0x02,
        AsymmetricAccessTransition = 0x03,
        ControllerPathingError = 0x60,
        HostPathingError = 0x70,
        CommandAbortedByHost = 0x71,
    }
);

/// A completion status without the phase bit, as carried in CQE bits 15:1.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Status {
    pub sct: u8,
    pub sc: u8,
    /// Command Retry Delay index.
    pub crd: u8,
    pub more: bool,
    /// Do Not Retry.
    pub dnr: bool,
}

impl Status {
    pub const SUCCESS: Status = Status {
        sct: 0,
        sc: 0,
        crd: 0,
        more: false,
        dnr: false,
    };

    pub const fn new(sct: u8, sc: u8) -> Self {
        Status {
            sct,
            sc,
            crd: 0,
            more: false,
            dnr: false,
        }
    }
    pub const fn generic(sc: GenericStatus) -> Self {
        Self::new(0, sc as u8)
    }
    pub const fn command_specific(sc: CommandSpecificStatus) -> Self {
        Self::new(1, sc as u8)
    }
    pub const fn media(sc: MediaStatus) -> Self {
        Self::new(2, sc as u8)
    }
    pub const fn path(sc: PathStatus) -> Self {
        Self::new(3, sc as u8)
    }
    pub const fn with_dnr(mut self) -> Self {
        self.dnr = true;
        self
    }
    pub fn is_success(&self) -> bool {
        self.sct == 0 && self.sc == 0
    }
    pub fn code_type(&self) -> StatusCodeType {
        StatusCodeType::from_bits(self.sct)
    }

    /// Decodes the 16-bit CQE status field (the phase bit is ignored).
    pub fn from_field(f: u16) -> Self {
        Status {
            sc: ((f >> 1) & 0xFF) as u8,
            sct: ((f >> 9) & 0x7) as u8,
            crd: ((f >> 12) & 0x3) as u8,
            more: f & (1 << 14) != 0,
            dnr: f & (1 << 15) != 0,
        }
    }
    /// Encodes the status into a 16-bit CQE status field with the given phase.
    pub fn to_field(&self, phase: bool) -> u16 {
        (phase as u16)
            | ((self.sc as u16) << 1)
            | (((self.sct & 7) as u16) << 9)
            | (((self.crd & 3) as u16) << 12)
            | ((self.more as u16) << 14)
            | ((self.dnr as u16) << 15)
    }

    /// A short human name, for logs and errors.
    pub fn describe(&self) -> String {
        let name = match self.code_type() {
            StatusCodeType::Generic => GenericStatus::from_u8(self.sc).map(|c| format!("{c:?}")),
            StatusCodeType::CommandSpecific => {
                CommandSpecificStatus::from_u8(self.sc).map(|c| format!("{c:?}"))
            }
            StatusCodeType::MediaError => MediaStatus::from_u8(self.sc).map(|c| format!("{c:?}")),
            StatusCodeType::Path => PathStatus::from_u8(self.sc).map(|c| format!("{c:?}")),
            _ => None,
        };
        format!(
            "{} (sct {:#x} sc {:#04x}{})",
            name.unwrap_or_else(|| "Unknown".into()),
            self.sct,
            self.sc,
            if self.dnr { " dnr" } else { "" }
        )
    }
}

impl std::fmt::Debug for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_round_trip() {
        let s = Status::command_specific(CommandSpecificStatus::ConnectInvalidHost).with_dnr();
        let f = s.to_field(true);
        // sc 0x84 << 1 | sct 1 << 9 | dnr | phase
        assert_eq!(f, 0x8000 | (1 << 9) | (0x84 << 1) | 1);
        assert_eq!(Status::from_field(f), s);
    }

    #[test]
    fn describe_names_codes() {
        let s = Status::generic(GenericStatus::CommandSequenceError);
        assert!(s.describe().starts_with("CommandSequenceError"));
        assert!(Status::SUCCESS.is_success());
    }
}
