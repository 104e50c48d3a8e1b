//! The backward pass of the vendored candle-core (vendor/README.md) stores a tensor's first
//! gradient contribution as it is instead of adding it to fresh zeros. These tests pin what
//! that must not change: contributions from several uses add up, views (transposes,
//! broadcasts) arrive as contiguous gradients of the tensor's own shape, and two tensors fed
//! the same upstream gradient do not share a stored sum.

use candle_core::{Device, Tensor, Var};

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn contributions_from_several_uses_add_up() {
    let dev = Device::Cpu;
    let x = Var::from_slice(&[1f32, -2., 3.], 3, &dev).unwrap();
    let a = Tensor::new(&[0.5f32, 1.5, -1.0], &dev).unwrap();
    let b = Tensor::new(&[2f32, -3., 4.], &dev).unwrap();
    // d/dx [sum(x·a) + sum(x·b) + sum(x + x)] = a + b + 2
    let y = ((x.as_tensor() * &a).unwrap().sum_all().unwrap()
        + (x.as_tensor() * &b).unwrap().sum_all().unwrap()
        + (x.as_tensor() + x.as_tensor()).unwrap().sum_all().unwrap())
    .unwrap();
    let grads = y.backward().unwrap();
    let g = grads.get(x.as_tensor()).unwrap();
    assert_eq!(values(g), vec![4.5, 0.5, 5.0]);
}

#[test]
fn a_transposed_use_gives_a_contiguous_gradient_of_the_tensors_shape() {
    let dev = Device::Cpu;
    let x = Var::from_slice(&[1f32, 2., 3., 4., 5., 6.], (2, 3), &dev).unwrap();
    let w = Tensor::new(&[[1f32, 10.], [100., 1000.], [0.5, -0.5]], &dev).unwrap();
    // y = sum(xᵀ ⊙ w): dy/dx = wᵀ, reached through the transpose's backward (a strided view).
    let y = (x.as_tensor().t().unwrap() * &w)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = y.backward().unwrap();
    let g = grads.get(x.as_tensor()).unwrap();
    assert_eq!(g.dims(), &[2, 3]);
    assert!(g.is_contiguous(), "stored gradient must be contiguous");
    assert_eq!(values(g), vec![1.0, 100.0, 0.5, 10.0, 1000.0, -0.5]);
}

#[test]
fn broadcast_and_reduced_uses_give_the_summed_gradient() {
    let dev = Device::Cpu;
    let bias = Var::from_slice(&[0f32, 0., 0.], 3, &dev).unwrap();
    let x = Tensor::new(&[[1f32, 2., 3.], [4., 5., 6.]], &dev).unwrap();
    let weights = Tensor::new(&[[1f32, 2., 3.], [-1., 0.5, 2.]], &dev).unwrap();
    // y = sum(weights ⊙ (x + bias)): dy/dbias = column sums of weights.
    let y = (x.broadcast_add(bias.as_tensor()).unwrap() * &weights)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = y.backward().unwrap();
    let g = grads.get(bias.as_tensor()).unwrap();
    assert!(g.is_contiguous());
    assert_eq!(values(g), vec![0.0, 2.5, 5.0]);

    // sum over a dimension: the gradient is the upstream one broadcast back (a stride-0
    // view upstream), materialised at the tensor's shape.
    let m = Var::from_slice(&[1f32, 2., 3., 4.], (2, 2), &dev).unwrap();
    let y = (m.as_tensor().sum_keepdim(1).unwrap() * Tensor::new(&[[3f32], [7.]], &dev).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = y.backward().unwrap();
    let g = grads.get(m.as_tensor()).unwrap();
    assert!(g.is_contiguous());
    assert_eq!(values(g), vec![3.0, 3.0, 7.0, 7.0]);
}

#[test]
fn two_tensors_fed_the_same_gradient_keep_separate_sums() {
    let dev = Device::Cpu;
    let a = Var::from_slice(&[1f32, 1.], 2, &dev).unwrap();
    let b = Var::from_slice(&[2f32, 2.], 2, &dev).unwrap();
    // The add's backward hands one gradient tensor to both arguments; `a` then receives a
    // second contribution (a·3), which must not show up in `b`'s gradient.
    let s = (a.as_tensor() + b.as_tensor()).unwrap();
    let y = (s.sum_all().unwrap() + (a.as_tensor() * 3.0).unwrap().sum_all().unwrap()).unwrap();
    let grads = y.backward().unwrap();
    assert_eq!(values(grads.get(a.as_tensor()).unwrap()), vec![4.0, 4.0]);
    assert_eq!(values(grads.get(b.as_tensor()).unwrap()), vec![1.0, 1.0]);
}
