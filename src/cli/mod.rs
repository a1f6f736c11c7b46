pub mod prior;
