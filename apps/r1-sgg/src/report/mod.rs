//! What a run leaves behind to read and look at: the JSONL metrics log,
//! charts, and the summary tables.

pub mod metrics;
pub mod plot;
pub mod summary;
