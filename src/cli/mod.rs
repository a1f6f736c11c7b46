pub mod ae;
pub mod prior;
