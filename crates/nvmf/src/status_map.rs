//! The one place where bdev I/O errors and NVMe completion statuses meet.

use bdev::IoError;
use nvme_wire::status::{GenericStatus, MediaStatus, PathStatus, StatusCodeType};
use nvme_wire::Status;

/// The NVMe status a target returns for a failed bdev I/O.
pub fn io_error_to_status(e: &IoError) -> Status {
    match e {
        IoError::OutOfRange => Status::generic(GenericStatus::LbaOutOfRange).with_dnr(),
        IoError::InvalidBuffer => Status::generic(GenericStatus::DataSglLengthInvalid).with_dnr(),
        IoError::NotSupported => Status::generic(GenericStatus::InvalidOpcode).with_dnr(),
        IoError::ReadOnly => Status::generic(GenericStatus::NamespaceWriteProtected).with_dnr(),
        IoError::NoSpace => Status::generic(GenericStatus::CapacityExceeded).with_dnr(),
        IoError::Removed => Status::generic(GenericStatus::NamespaceNotReady).with_dnr(),
        IoError::Aborted => Status::generic(GenericStatus::AbortRequested),
        IoError::Timeout | IoError::NoPath => Status::path(PathStatus::InternalPathError),
        IoError::Media => Status::media(MediaStatus::UnrecoveredReadError),
        IoError::Errno(_) | IoError::Remote(_) => Status::generic(GenericStatus::DataTransferError),
    }
}

/// The bdev error a host reports for a failed NVMe command.
pub fn status_to_io_error(s: Status) -> IoError {
    use GenericStatus as G;
    match (s.code_type(), s.sc) {
        (StatusCodeType::Generic, c) if c == G::LbaOutOfRange as u8 => IoError::OutOfRange,
        (StatusCodeType::Generic, c) if c == G::CapacityExceeded as u8 => IoError::NoSpace,
        (StatusCodeType::Generic, c) if c == G::NamespaceWriteProtected as u8 => IoError::ReadOnly,
        (StatusCodeType::Generic, c) if c == G::InvalidOpcode as u8 => IoError::NotSupported,
        (StatusCodeType::Generic, c) if c == G::AbortRequested as u8 => IoError::Aborted,
        (StatusCodeType::MediaError, c) if c == MediaStatus::UnrecoveredReadError as u8 => {
            IoError::Media
        }
        (StatusCodeType::Path, _) => IoError::NoPath,
        _ => IoError::Remote(s.describe()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_where_meaningful() {
        for e in [
            IoError::OutOfRange,
            IoError::NoSpace,
            IoError::ReadOnly,
            IoError::NotSupported,
            IoError::Aborted,
            IoError::Media,
            IoError::NoPath,
        ] {
            assert_eq!(status_to_io_error(io_error_to_status(&e)), e, "{e:?}");
        }
    }
}
