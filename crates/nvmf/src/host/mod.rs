//! NVMe/TCP host.
