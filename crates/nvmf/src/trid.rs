//! Transport identifiers: where a subsystem is reached.

use serde::{Deserialize, Serialize};

/// Address family of a transport address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdrFam {
    Ipv4,
    Ipv6,
}

impl AdrFam {
    pub fn as_str(self) -> &'static str {
        match self {
            AdrFam::Ipv4 => "ipv4",
            AdrFam::Ipv6 => "ipv6",
        }
    }
    /// Parses SPDK's spelling ("ipv4", "IPv4").
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "ipv4" => Some(AdrFam::Ipv4),
            "ipv6" => Some(AdrFam::Ipv6),
            _ => None,
        }
    }
    pub fn of(addr: &std::net::IpAddr) -> Self {
        if addr.is_ipv4() {
            AdrFam::Ipv4
        } else {
            AdrFam::Ipv6
        }
    }
    /// The discovery log's ADRFAM code.
    pub fn code(self) -> u8 {
        match self {
            AdrFam::Ipv4 => nvme_wire::log::ADRFAM_IPV4,
            AdrFam::Ipv6 => nvme_wire::log::ADRFAM_IPV6,
        }
    }
}

/// A TCP transport ID: address, service (port) and subsystem NQN. Two
/// controllers with equal TransportIds and host NQNs are "the same path" in
/// SPDK's sense.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TransportId {
    pub adrfam: AdrFam,
    pub traddr: String,
    pub trsvcid: String,
    pub subnqn: String,
}

impl TransportId {
    pub fn new(traddr: &str, trsvcid: &str, subnqn: &str) -> Self {
        let adrfam = if traddr.contains(':') {
            AdrFam::Ipv6
        } else {
            AdrFam::Ipv4
        };
        TransportId {
            adrfam,
            traddr: traddr.to_string(),
            trsvcid: trsvcid.to_string(),
            subnqn: subnqn.to_string(),
        }
    }
    /// `host:port` for connecting.
    pub fn socket_addr_string(&self) -> String {
        match self.adrfam {
            AdrFam::Ipv4 => format!("{}:{}", self.traddr, self.trsvcid),
            AdrFam::Ipv6 => format!("[{}]:{}", self.traddr, self.trsvcid),
        }
    }
    /// Same network path: address family, address and service (not the NQN).
    pub fn same_path(&self, o: &TransportId) -> bool {
        self.adrfam == o.adrfam && self.traddr == o.traddr && self.trsvcid == o.trsvcid
    }
}

impl std::fmt::Display for TransportId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tcp:{}:{}/{}", self.traddr, self.trsvcid, self.subnqn)
    }
}
