//! `rankstack serve`: the online scoring server (the work is in [`crate::serve`]).

use rankstack_nn::Result;

pub use crate::serve::ServeOptions;

/// Runs the server until SIGTERM or SIGINT (see [`crate::serve::serve`]).
pub fn serve(options: ServeOptions) -> Result<String> {
    crate::serve::serve(options)
}
