//! `nix_cache = true`: the guest's Nix substitutes from the host's store.
//!
//! The daemon serves `/nix/store` over HTTP in the nix-serve protocol on
//! the host's address on the guest links (`host.subnet4`'s network address,
//! the same on every link), port [`NIX_CACHE_PORT`], to the guests that ask
//! for it. This module only computes what the guest is told.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// TCP port of the host's binary cache (nix-serve's usual 5000 is left to
/// a nix-serve the host may run itself).
pub const NIX_CACHE_PORT: u16 = 5480;

/// `http://HOST4:5480`: the cache as a guest on `host4`'s links reaches it.
pub fn nix_cache_url(host4: Ipv4Addr) -> String {
    format!("http://{host4}:{NIX_CACHE_PORT}")
}

/// Adds `BERTH_NIX_CACHE=URL` and an `extra-substituters = URL` line to
/// `NIX_CONFIG` (after the spec's own NIX_CONFIG lines, if any).
pub(crate) fn guest_env(env: &mut BTreeMap<String, String>, host4: Ipv4Addr) {
    let url = nix_cache_url(host4);
    let line = format!("extra-substituters = {url}");
    let config = match env.get("NIX_CONFIG") {
        Some(own) if !own.trim().is_empty() => format!("{}\n{line}", own.trim_end()),
        _ => line,
    };
    env.insert("NIX_CONFIG".into(), config);
    env.insert("BERTH_NIX_CACHE".into(), url);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_env_adds_the_substituter_after_the_specs_own_settings() {
        let host = Ipv4Addr::new(10, 0, 0, 0);
        let mut env = BTreeMap::new();
        guest_env(&mut env, host);
        assert_eq!(
            env["NIX_CONFIG"],
            "extra-substituters = http://10.0.0.0:5480"
        );
        assert_eq!(env["BERTH_NIX_CACHE"], "http://10.0.0.0:5480");
        let mut env = BTreeMap::from([("NIX_CONFIG".to_string(), "sandbox = false\n".to_string())]);
        guest_env(&mut env, host);
        assert_eq!(
            env["NIX_CONFIG"],
            "sandbox = false\nextra-substituters = http://10.0.0.0:5480"
        );
    }
}
