//! fewshot (to be written).
