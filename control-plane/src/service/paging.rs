//! One page of a listing, bounded by rows and by bytes: rows are read from the store in
//! chunks sized to what is left of the byte budget, converted to their wire form once, and
//! the page ends at whichever bound comes first (always with at least one row). So a page
//! of large policies or audit events never builds a response a client cannot read, and the
//! server never holds more than about one budget of rows for it.

use std::future::Future;

use prost::Message;

use crate::store::StoreError;

/// Bytes a page's items may take on the wire, about. Below the 4 MiB that gRPC clients
/// accept by default, and above the largest single item (a 1 MiB policy before and after,
/// in one audit event), so every item fits a page of its own.
pub const PAGE_BYTES: usize = 3 * 1024 * 1024;

/// Rows read by the first query of a page, so that a default page (50 rows and the one that
/// tells whether more follow) takes one query; later queries are sized by the rows seen.
const FIRST_CHUNK: usize = 64;
/// Rows read by one query at most.
const MAX_CHUNK: usize = 1000;

/// A page: its items in wire form, and where the next page starts if there is one.
#[derive(Debug)]
pub struct Page<P, C> {
    /// The items.
    pub items: Vec<P>,
    /// The position of the last item, when more follow.
    pub next: Option<C>,
}

/// Reads one page of at most `limit` items and about `budget` bytes, starting after
/// `start`. `fetch(after, n)` reads up to `n` rows after a position, in listing order;
/// `wire` converts a row; `position` is where a row stands.
pub async fn read<T, P, C, F, Fut>(
    limit: u32,
    budget: usize,
    start: Option<C>,
    mut fetch: F,
    wire: impl Fn(&T) -> P,
    position: impl Fn(&T) -> C,
) -> Result<Page<P, C>, StoreError>
where
    P: Message,
    C: Clone,
    F: FnMut(Option<C>, u32) -> Fut,
    Fut: Future<Output = Result<Vec<T>, StoreError>>,
{
    let limit = limit.max(1) as usize;
    let mut items = Vec::new();
    let mut bytes = 0usize;
    let mut after = start;
    let mut chunk = FIRST_CHUNK;
    loop {
        // One row more than the page holds tells whether another page follows.
        let want = chunk.min(limit + 1 - items.len());
        let rows = fetch(after.clone(), want as u32).await?;
        let exhausted = rows.len() < want;
        for row in rows {
            let item = wire(&row);
            let size = item.encoded_len();
            if items.len() == limit || (!items.is_empty() && bytes + size > budget) {
                return Ok(Page { items, next: after });
            }
            bytes += size;
            after = Some(position(&row));
            items.push(item);
        }
        if exhausted {
            return Ok(Page { items, next: None });
        }
        let average = (bytes / items.len().max(1)).max(1);
        chunk = (budget.saturating_sub(bytes) / average).clamp(1, MAX_CHUNK);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows `1..=n` of `size` bytes each, read like a store would.
    async fn page_of(
        n: u32,
        size: usize,
        limit: u32,
        budget: usize,
        start: Option<u32>,
    ) -> (Vec<u32>, Option<u32>, Vec<u32>) {
        let queries = std::cell::RefCell::new(Vec::new());
        let page = read(
            limit,
            budget,
            start,
            |after: Option<u32>, want: u32| {
                queries.borrow_mut().push(want);
                let from = after.unwrap_or(0) + 1;
                let rows: Vec<u32> = (from..=n).take(want as usize).collect();
                async move { Ok(rows) }
            },
            |row: &u32| prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(format!(
                    "{row}{}",
                    "x".repeat(size)
                ))),
            },
            |row: &u32| *row,
        )
        .await
        .unwrap();
        let items = page
            .items
            .iter()
            .map(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => {
                    s.trim_end_matches('x').parse().unwrap()
                }
                _ => unreachable!(),
            })
            .collect();
        (items, page.next, queries.into_inner())
    }

    #[tokio::test]
    async fn a_page_ends_at_its_row_limit() {
        let (items, next, _) = page_of(100, 10, 30, PAGE_BYTES, None).await;
        assert_eq!(items, (1..=30).collect::<Vec<_>>());
        assert_eq!(next, Some(30));
        let (items, next, _) = page_of(100, 10, 30, PAGE_BYTES, Some(90)).await;
        assert_eq!(items, (91..=100).collect::<Vec<_>>());
        assert_eq!(next, None, "the last page");
    }

    #[tokio::test]
    async fn a_page_ends_at_its_byte_budget_with_at_least_one_row() {
        let (items, next, queries) = page_of(100, 1000, 1000, 10_000, None).await;
        assert!((9..=10).contains(&items.len()), "{items:?}");
        assert_eq!(next, items.last().copied());
        assert_eq!(queries, [64], "one query for a page that fits it");
        let (items, next, _) = page_of(5, 50_000, 1000, 10_000, None).await;
        assert_eq!(
            items,
            [1],
            "one row larger than the budget still makes a page"
        );
        assert_eq!(next, Some(1));
    }

    #[tokio::test]
    async fn an_exact_fit_says_no_more() {
        let (items, next, _) = page_of(30, 10, 30, PAGE_BYTES, None).await;
        assert_eq!(items.len(), 30);
        assert_eq!(next, None);
    }
}
