//! What the crate's unit tests share: an [`Admin`] on a SQLite store in a temporary directory,
//! with a manual clock and the default workspace.

#![allow(clippy::unwrap_used, reason = "tests")]

use std::sync::Arc;

use keygate_core::ids::WorkspaceId;
use keygate_core::secret::{OsRandom, Pepper};
use keygate_core::store::Store;
use keygate_core::{ManualClock, Timestamp};

use crate::service::{Admin, AdminSettings};

/// An admin service on a fresh store (kept while the directory lives), its clock at a fixed
/// instant, and the default workspace's id.
pub(crate) async fn admin() -> (Arc<Admin>, ManualClock, tempfile::TempDir, WorkspaceId) {
    let dir = tempfile::tempdir().unwrap();
    let store = keygate_store::open(&keygate_store::StoreLocation::DataDir(dir.path().to_owned())).await.unwrap();
    let store: Arc<dyn Store> = store;
    let clock = ManualClock::new(Timestamp::from_millis(1_900_000_000_000));
    let admin = Arc::new(Admin::new(
        store,
        Pepper::new(&[5; 32]).unwrap(),
        AdminSettings::default(),
        Arc::new(clock.clone()),
        Arc::new(OsRandom),
    ));
    let ws = admin.bootstrap().await.unwrap().id;
    (admin, clock, dir, ws)
}
