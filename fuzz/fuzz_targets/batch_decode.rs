//! Every byte of a batch is hostile: decoding arbitrary input must end in an
//! error or in ops that each pass validation, without panicking, hanging, or
//! allocating beyond the format's limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use replicator::batch::{BatchReader, validate};

fuzz_target!(|data: &[u8]| {
    if let Ok(mut reader) = BatchReader::new(data) {
        while let Ok(Some(op)) = reader.next_op() {
            assert!(op.validate().is_ok(), "the decoder returned an invalid op: {op:?}");
        }
    }
    let _ = validate(data);
});
