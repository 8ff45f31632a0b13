//! Edge selection (sans-IO): nearest edge by great-circle distance, with overrides.

use amphi_protocol::config::EdgeEndpoint;

/// Mean Earth radius in kilometres.
const EARTH_RADIUS_KM: f64 = 6371.0;

/// A point on Earth in degrees.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GeoPoint {
    /// Latitude, degrees.
    pub latitude: f64,
    /// Longitude, degrees.
    pub longitude: f64,
}

/// Great-circle distance in kilometres (haversine).
pub fn distance_km(a: GeoPoint, b: GeoPoint) -> f64 {
    let (la1, la2) = (a.latitude.to_radians(), b.latitude.to_radians());
    let dlat = la2 - la1;
    let dlon = (b.longitude - a.longitude).to_radians();
    let h = (dlat / 2.0).sin().powi(2) + la1.cos() * la2.cos() * (dlon / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * h.sqrt().min(1.0).asin()
}

/// What the caller knows about the client.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ClientPlace<'a> {
    /// A region was asked for explicitly (dev mode override).
    Region(&'a str),
    /// The client's location is known.
    Located(GeoPoint),
    /// Nothing known (loopback, private or unknown address).
    Unknown,
}

/// The chosen edge and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice<'e> {
    /// The edge.
    pub edge: &'e EdgeEndpoint,
    /// Short explanation for operators.
    pub why: String,
}

/// Why no edge could be chosen.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectError {
    /// No edges are configured or healthy.
    #[error("no edge available")]
    NoEdge,
    /// The requested region has no edge.
    #[error("no edge in region {0}")]
    UnknownRegion(String),
}

/// Pick an edge for a client. Ties break on edge id, so the answer is deterministic.
pub fn select_edge<'e>(
    place: ClientPlace<'_>,
    edges: &'e [EdgeEndpoint],
    default_region: &str,
) -> Result<Choice<'e>, SelectError> {
    let in_region = |region: &str| {
        edges
            .iter()
            .filter(|e| e.region.name == region)
            .min_by(|a, b| a.id.cmp(&b.id))
    };
    match place {
        ClientPlace::Region(region) => in_region(region)
            .map(|edge| Choice {
                edge,
                why: format!("region {region} requested"),
            })
            .ok_or_else(|| SelectError::UnknownRegion(region.to_string())),
        ClientPlace::Unknown => in_region(default_region)
            .or_else(|| edges.iter().min_by(|a, b| a.id.cmp(&b.id)))
            .map(|edge| Choice {
                edge,
                why: format!("client location unknown: default region {default_region}"),
            })
            .ok_or(SelectError::NoEdge),
        ClientPlace::Located(at) => {
            let dist = |e: &EdgeEndpoint| {
                distance_km(
                    at,
                    GeoPoint {
                        latitude: e.region.latitude,
                        longitude: e.region.longitude,
                    },
                )
            };
            edges
                .iter()
                .min_by(|a, b| dist(a).total_cmp(&dist(b)).then_with(|| a.id.cmp(&b.id)))
                .map(|edge| Choice {
                    edge,
                    why: format!("nearest of {} edges: {:.0} km", edges.len(), dist(edge)),
                })
                .ok_or(SelectError::NoEdge)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amphi_protocol::config::known_region;

    fn edges() -> Vec<EdgeEndpoint> {
        ["us-east", "eu-west"]
            .iter()
            .map(|r| EdgeEndpoint {
                id: format!("edge-{r}"),
                region: known_region(r).unwrap(),
                public_url: format!("http://{r}"),
            })
            .collect()
    }

    #[test]
    fn distance_is_plausible() {
        let nyc = GeoPoint {
            latitude: 40.71,
            longitude: -74.0,
        };
        let london = GeoPoint {
            latitude: 51.51,
            longitude: -0.13,
        };
        let d = distance_km(nyc, london);
        assert!((d - 5570.0).abs() < 30.0, "{d}");
        assert_eq!(distance_km(nyc, nyc), 0.0);
    }

    #[test]
    fn unknown_clients_get_the_default_region() {
        let e = edges();
        assert_eq!(
            select_edge(ClientPlace::Unknown, &e, "us-east")
                .unwrap()
                .edge
                .id,
            "edge-us-east"
        );
        assert_eq!(
            select_edge(ClientPlace::Unknown, &e, "eu-west")
                .unwrap()
                .edge
                .id,
            "edge-eu-west"
        );
    }

    #[test]
    fn located_clients_get_the_nearest_edge() {
        let e = edges();
        let paris = GeoPoint {
            latitude: 48.86,
            longitude: 2.35,
        };
        let c = select_edge(ClientPlace::Located(paris), &e, "us-east").unwrap();
        assert_eq!(c.edge.id, "edge-eu-west");
        assert!(c.why.contains("nearest of 2"), "{}", c.why);
    }

    #[test]
    fn region_override_and_errors() {
        let e = edges();
        assert_eq!(
            select_edge(ClientPlace::Region("eu-west"), &e, "us-east")
                .unwrap()
                .edge
                .id,
            "edge-eu-west"
        );
        assert_eq!(
            select_edge(ClientPlace::Region("mars"), &e, "us-east"),
            Err(SelectError::UnknownRegion("mars".into()))
        );
        assert_eq!(
            select_edge(ClientPlace::Unknown, &[], "us-east"),
            Err(SelectError::NoEdge)
        );
    }
}
