//! Opaque page tokens (AIP-158): where a listing's next page starts, bound to the listing
//! and the filter it was made for, and signed, so that a token the server did not make, or
//! one changed on the way, is refused rather than read.
//!
//! A token is unpadded base64url of: a version byte, 16 bytes of the SHA-256 of the listing
//! and its filter, the position, and a 16-byte HMAC-SHA256 tag over all of that. The key is
//! kept in the database, made by whichever replica starts first, so every replica honours
//! every other replica's tokens.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use tonic::Status;

use crate::status::bad_request;

/// The layout of tokens made now; a token of another version is refused.
const VERSION: u8 = 1;
/// Bytes of the listing-and-filter digest.
const SCOPE: usize = 16;
/// Bytes of the tag.
const TAG: usize = 16;
/// The name of the key in the store's secrets.
pub const KEY_NAME: &str = "page_tokens";

/// Makes and checks page tokens under one key.
#[derive(Clone)]
pub struct PageTokens {
    key: [u8; 32],
}

impl std::fmt::Debug for PageTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PageTokens { key: <secret> }")
    }
}

impl PageTokens {
    /// Tokens signed with `key`.
    pub fn new(key: [u8; 32]) -> Self {
        PageTokens { key }
    }

    /// The token of the page after `position` in `listing` filtered by `filter`.
    pub fn encode(&self, listing: &str, filter: &str, position: &str) -> String {
        let mut bytes = Vec::with_capacity(1 + SCOPE + position.len() + TAG);
        bytes.push(VERSION);
        bytes.extend_from_slice(&scope(listing, filter));
        bytes.extend_from_slice(position.as_bytes());
        let tag = self.tag(&bytes);
        bytes.extend_from_slice(&tag);
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The position a token made by [`encode`](Self::encode) for the same listing and
    /// filter carries; `None` for an empty token (the first page). A token that is not one
    /// of this server's, or that was changed, is `INVALID_ARGUMENT`, and so is one made for
    /// another filter.
    pub fn decode(
        &self,
        token: &str,
        listing: &str,
        filter: &str,
    ) -> Result<Option<String>, Status> {
        if token.is_empty() {
            return Ok(None);
        }
        let forged = || {
            bad_request(
                "page_token",
                "not a page token of this listing; start again without one",
            )
        };
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| forged())?;
        if bytes.len() < 1 + SCOPE + TAG || bytes[0] != VERSION {
            return Err(forged());
        }
        let (signed, tag) = bytes.split_at(bytes.len() - TAG);
        let mut mac = self.mac();
        mac.update(signed);
        mac.verify_truncated_left(tag).map_err(|_| forged())?;
        if signed[1..=SCOPE] != scope(listing, filter) {
            return Err(bad_request(
                "page_token",
                "the page token was made for other filters; send the same filters as the call that returned it, or start again without a token",
            ));
        }
        String::from_utf8(signed[1 + SCOPE..].to_vec())
            .map(Some)
            .map_err(|_| forged())
    }

    /// The token of the page after `next`, or none when there is no next page.
    pub fn next(&self, listing: &str, filter: &str, next: Option<&str>) -> String {
        next.map(|position| self.encode(listing, filter, position))
            .unwrap_or_default()
    }

    fn mac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes a key of any size")
    }

    fn tag(&self, bytes: &[u8]) -> [u8; TAG] {
        let mut mac = self.mac();
        mac.update(bytes);
        let full = mac.finalize().into_bytes();
        let mut tag = [0; TAG];
        tag.copy_from_slice(&full[..TAG]);
        tag
    }
}

/// What binds a token to its listing and filter.
fn scope(listing: &str, filter: &str) -> [u8; SCOPE] {
    let digest = Sha256::new()
        .chain_update(listing.as_bytes())
        .chain_update([0])
        .chain_update(filter.as_bytes())
        .finalize();
    let mut out = [0; SCOPE];
    out.copy_from_slice(&digest[..SCOPE]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> PageTokens {
        PageTokens::new([7; 32])
    }

    #[test]
    fn a_token_round_trips_for_its_listing_and_filter() {
        let t = tokens().encode("policies", "shop", "shop-9");
        assert_eq!(
            tokens().decode(&t, "policies", "shop").unwrap(),
            Some("shop-9".into())
        );
        assert_eq!(tokens().decode("", "policies", "shop").unwrap(), None);
        assert!(!t.contains("shop"), "the position is not readable: {t}");
    }

    #[test]
    fn a_token_for_another_filter_or_listing_is_refused() {
        let t = tokens().encode("policies", "shop", "shop-9");
        let other_filter = tokens().decode(&t, "policies", "").unwrap_err();
        assert!(
            other_filter.message().contains("other filters"),
            "{other_filter:?}"
        );
        assert!(tokens().decode(&t, "sidecars", "shop").is_err());
    }

    #[test]
    fn forged_and_tampered_tokens_are_refused() {
        let t = tokens().encode("audit", "f", "100:7");
        let mut bytes = URL_SAFE_NO_PAD.decode(&t).unwrap();
        // Every single-bit change anywhere is caught.
        for i in 0..bytes.len() {
            bytes[i] ^= 1;
            let tampered = URL_SAFE_NO_PAD.encode(&bytes);
            assert!(
                tokens().decode(&tampered, "audit", "f").is_err(),
                "byte {i}"
            );
            bytes[i] ^= 1;
        }
        // Made with another key.
        let foreign = PageTokens::new([8; 32]).encode("audit", "f", "100:7");
        assert!(tokens().decode(&foreign, "audit", "f").is_err());
        // The old, readable format, and plain garbage.
        for forged in [hex::encode("audit\0f\x00100:7"), "!!".into(), "AAAA".into()] {
            let e = tokens().decode(&forged, "audit", "f").unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
        }
    }
}
