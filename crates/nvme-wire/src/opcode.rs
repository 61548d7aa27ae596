//! Command opcodes: admin, NVM I/O, fabrics command types, feature identifiers,
//! log page identifiers and Identify CNS values.

macro_rules! opcodes {
    ($(#[$m:meta])* $name:ident { $($v:ident = $c:expr),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum $name { $($v = $c),* }
        impl $name {
            pub fn from_u8(v: u8) -> Option<Self> {
                match v { $($c => Some(Self::$v),)* _ => None }
            }
        }
    };
}

opcodes!(
    /// Admin command opcodes.
    AdminOpcode {
        DeleteIoSq = 0x00,
        CreateIoSq = 0x01,
        GetLogPage = 0x02,
        DeleteIoCq = 0x04,
        CreateIoCq = 0x05,
        Identify = 0x06,
        Abort = 0x08,
        SetFeatures = 0x09,
        GetFeatures = 0x0A,
        AsyncEventRequest = 0x0C,
        KeepAlive = 0x18,
        Fabrics = 0x7F,
    }
);

opcodes!(
    /// NVM command set I/O opcodes.
    IoOpcode {
        Flush = 0x00,
        Write = 0x01,
        Read = 0x02,
        WriteZeroes = 0x08,
        DatasetManagement = 0x09,
        Fabrics = 0x7F,
    }
);

opcodes!(
    /// Fabrics command types (SQE byte 4 when opcode is 0x7F).
    FabricsType {
        PropertySet = 0x00,
        Connect = 0x01,
        PropertyGet = 0x04,
        AuthSend = 0x05,
        AuthRecv = 0x06,
        Disconnect = 0x08,
    }
);

opcodes!(
    /// Feature identifiers (Get/Set Features cdw10 bits 7:0).
    FeatureId {
        Arbitration = 0x01,
        PowerManagement = 0x02,
        TemperatureThreshold = 0x04,
        ErrorRecovery = 0x05,
        VolatileWriteCache = 0x06,
        NumberOfQueues = 0x07,
        InterruptCoalescing = 0x08,
        WriteAtomicity = 0x0A,
        AsyncEventConfig = 0x0B,
        KeepAliveTimer = 0x0F,
        HostIdentifier = 0x81,
    }
);

opcodes!(
    /// Log page identifiers (Get Log Page cdw10 bits 7:0).
    LogPageId {
        Error = 0x01,
        Smart = 0x02,
        FirmwareSlot = 0x03,
        ChangedNamespaces = 0x04,
        CommandsSupported = 0x05,
        Ana = 0x0C,
        Discovery = 0x70,
    }
);

opcodes!(
    /// Identify Controller or Namespace Structure (CNS, cdw10 bits 7:0).
    Cns {
        Namespace = 0x00,
        Controller = 0x01,
        ActiveNamespaceList = 0x02,
        NsDescriptorList = 0x03,
    }
);
