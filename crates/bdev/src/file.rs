//! File bdev: placeholder, implemented with io_uring.
