#!/usr/bin/perl
# Writes a small GeoIP2-City-schema database (location.latitude/longitude, country.iso_code) for
# the GeoIP2 path of the geo-router tests. Usage: write_fixture.pl OUT.mmdb
# Networks are documentation-free public ranges chosen so each lands near one test region.
use strict;
use warnings;
use MaxMind::DB::Writer::Tree;

my $out = shift or die "usage: $0 OUT.mmdb\n";
my %types = (
    location  => 'map',
    latitude  => 'double',
    longitude => 'double',
    country   => 'map',
    iso_code  => 'utf8_string',
    city      => 'map',
    names     => 'map',
    en        => 'utf8_string',
);
my $tree = MaxMind::DB::Writer::Tree->new(
    ip_version               => 6,
    record_size              => 28,
    database_type            => 'GeoIP2-City',
    languages                => ['en'],
    description              => { en => 'amphi GeoIP2-schema test fixture' },
    map_key_type_callback    => sub { $types{ $_[0] } },
    remove_reserved_networks => 0,
);
sub city {
    my ($lat, $lon, $cc, $name) = @_;
    return {
        location => { latitude => $lat, longitude => $lon },
        country  => { iso_code => $cc },
        city     => { names => { en => $name } },
    };
}
# Paris -> eu-west; Tokyo -> ap-southeast (Singapore) is nearer than Sydney; Seattle -> us-east.
$tree->insert_network('81.2.69.0/24', city(48.86, 2.35, 'FR', 'Paris'));
$tree->insert_network('2001:218::/32', city(35.68, 139.69, 'JP', 'Tokyo'));
$tree->insert_network('175.16.199.0/24', city(35.68, 139.69, 'JP', 'Tokyo'));
$tree->insert_network('216.160.83.0/24', city(47.61, -122.33, 'US', 'Seattle'));
# A record without coordinates: the router must treat it as unknown.
$tree->insert_network('89.160.20.0/24', { country => { iso_code => 'SE' } });
open my $fh, '>:raw', $out or die "open $out: $!";
$tree->write_tree($fh);
close $fh or die "close $out: $!";
