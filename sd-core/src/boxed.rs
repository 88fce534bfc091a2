//! The plumbing of the boxed, object-safe handles (`BoxStore`, ...) each pattern crate
//! offers beside its `impl Future` trait.

use std::future::Future;
use std::pin::Pin;

/// A boxed future that is `Send`, as the object-safe twins return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Writes the object-safe twin of an async trait and the boxed handle's impl of it, from
/// one list of the trait's methods:
///
/// - `trait $dyn`: the same methods, each returning a [`BoxFuture`], plus
///   `type_name()` (the boxed type's name, for a `Debug` impl);
/// - its blanket impl for every `'static` implementor of the trait;
/// - the trait's impl for the handle, a struct whose `inner` field is an `Arc<dyn $dyn>`,
///   forwarding each call.
///
/// In the list, the borrowed arguments come before the `;` (the twin borrows each for
/// the future's life), the owned ones after it. Every method returns the calling crate's
/// `Result<T>`, which must be in scope. The handle's methods are `async fn`: a boxed
/// future borrowing several arguments has one lifetime, their intersection, which a
/// return-position `impl Future` cannot name.
///
/// ```
/// use std::sync::Arc;
///
/// type Result<T> = std::result::Result<T, String>;
///
/// trait Store: Send + Sync {
///     fn get(&self, key: &str) -> impl Future<Output = Result<Option<u64>>> + Send;
/// }
///
/// struct Fixed;
/// impl Store for Fixed {
///     async fn get(&self, key: &str) -> Result<Option<u64>> {
///         Ok((key == "a").then_some(1))
///     }
/// }
///
/// struct BoxStore {
///     inner: Arc<dyn DynStore>,
/// }
///
/// sd_core::boxed_twin! {
///     impl Store for BoxStore via DynStore;
///     fn get(key: &str;) -> Option<u64>;
/// }
///
/// let store = BoxStore { inner: Arc::new(Fixed) };
/// let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
/// // Both traits are in scope here, so name the one meant (a crate's users see only `Store`).
/// assert_eq!(rt.block_on(Store::get(&store, "a")), Ok(Some(1)));
/// assert!(store.inner.type_name().ends_with("Fixed"));
/// ```
#[macro_export]
macro_rules! boxed_twin {
    (
        impl $trait:ident for $boxed:ident via $dyn:ident;
        $(fn $name:ident($($arg:ident: &$ty:ty),* ; $($own:ident: $oty:ty),*) -> $out:ty;)*
    ) => {
        trait $dyn: Send + Sync + 'static {
            $(
                fn $name<'a>(&'a self $(, $arg: &'a $ty)* $(, $own: $oty)*)
                    -> $crate::boxed::BoxFuture<'a, Result<$out>>;
            )*
            /// The boxed type's name.
            #[allow(dead_code)]
            fn type_name(&self) -> &'static str;
        }

        impl<S: $trait + 'static> $dyn for S {
            $(
                fn $name<'a>(&'a self $(, $arg: &'a $ty)* $(, $own: $oty)*)
                    -> $crate::boxed::BoxFuture<'a, Result<$out>> {
                    ::std::boxed::Box::pin($trait::$name(self $(, $arg)* $(, $own)*))
                }
            )*
            fn type_name(&self) -> &'static str {
                ::std::any::type_name::<S>()
            }
        }

        impl $trait for $boxed {
            $(
                async fn $name(&self $(, $arg: &$ty)* $(, $own: $oty)*) -> Result<$out> {
                    self.inner.$name($($arg,)* $($own),*).await
                }
            )*
        }
    };
}
